"""The Siamese network's two scoring stages: the embedding's cosine and the pair head."""
from __future__ import annotations

import numpy as np
import torch

from core.gallery import Gallery
from core.stage import ALL, PairBatch, StageContext, StageOutput


class EmbeddingStage:
    """Cosine similarity of the (centred, L2-normalised) embeddings as the shortlist search compares
    them (whitened where the run has an embedding whitening, `Engine.searchable`): the shortlist's own
    score, a share of it (`MatchConfig.individual_weight`) the cosine to the mean of the photo's
    individual's photos of its viewpoint (`siamese.index.IndividualMeans`)."""
    name = "embedding"
    scope = ALL
    # Before calibration, new_individual goes before the first candidate whose cosine is below this.
    # On the nyala development set the pretrained mobilenetv2_100's best cosine per query lies
    # between 0.25 and 0.61 (median 0.44).
    default_tau = 0.50
    # The whitened cosine (train-siamese --whiten-embedding) runs lower: on five trained networks of the
    # development set each query's best whitened cosine has a median of 0.26-0.27 where the plain one
    # has 0.56-0.59, so this plays the part 0.50 plays for the plain cosine.
    default_tau_whitened = 0.25

    def __init__(self, model, whitened: bool = False):
        self.model = model
        if whitened:
            self.default_tau = self.default_tau_whitened

    @classmethod
    def load(cls, ctx: StageContext) -> "EmbeddingStage":
        return cls(ctx.model, whitened=ctx.run.embedding_whitening_path.is_file())

    def config(self) -> dict:
        return self.model.config.to_dict()

    def score(self, batch: PairBatch, gallery: Gallery, progress: bool = False) -> StageOutput:
        return StageOutput(np.asarray(batch.similarity, dtype=np.float64))


class PairHeadStage:
    """The trained pair head's P(same individual) over [a*b, a+b, |a-b|, (a-b)^2]."""
    name = "siamese"
    scope = ALL
    default_tau = 0.5  # a probability

    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls, ctx: StageContext) -> "PairHeadStage | None":
        trained = bool(ctx.config.get("train", {}).get("epochs", 0))
        return cls(ctx.model) if trained else None

    def config(self) -> dict:
        return self.model.config.to_dict()

    def score(self, batch: PairBatch, gallery: Gallery, progress: bool = False) -> StageOutput:
        device = next(self.model.parameters()).device
        out = np.zeros(len(batch), dtype=np.float64)
        # one query's pairs at a time (as many rows as its shortlist: the same arithmetic as ever)
        bounds = np.flatnonzero(np.diff(batch.query_pos)) + 1
        for part in np.split(np.arange(len(batch)), bounds):
            if not len(part):
                continue
            q = torch.from_numpy(batch.query_embeddings[batch.query_pos[part[0]]]).to(device)
            g = torch.from_numpy(gallery.embeddings[batch.gallery_idx[part]]).to(device)
            with torch.no_grad():
                logit = self.model.pair_logit(q.expand(len(part), -1), g)
            out[part] = torch.sigmoid(logit.float()).cpu().numpy().astype(np.float64)
        return StageOutput(out)
