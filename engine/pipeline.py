"""Matching: queries -> embeddings -> faiss shortlist -> per-individual ranking -> top-5.

Later stages (pair head, keypoint verifier, calibrated fusion) plug into `Engine.score`.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.catalog import Record
from engine.errors import UserError
from engine.gallery import Gallery
from engine.metrics import NEW_INDIVIDUAL
from engine.runfolder import RunFolder, atomic_write_bytes, atomic_write_json
from engine.runtime import torch_device
from ranker.aggregate import aggregate_per_individual, top5_with_new
from siamese.embed import EmbedResult, embed_records
from siamese.index import EmbeddingIndex
from siamese.model import ModelConfig, SiameseNet

log = logging.getLogger(__name__)

# Until `calibrate` has run, `new_individual` goes before the first candidate whose cosine
# similarity is below this. Chosen on the synthetic sample and the nyala development set for the
# pretrained mobilenetv2_100 (GeM features are non-negative, so cosines sit high).
DEFAULT_TAU = 0.80


@dataclass(frozen=True)
class MatchConfig:
    shortlist: int = 50  # K: gallery images proposed by the embedding index per query
    tau: float | None = None  # None: calibration.json's, else DEFAULT_TAU
    batch_size: int = 32
    workers: int = 2


@dataclass
class Candidate:
    individual_id: str
    score: float  # the score the ranking used
    gallery_index: int  # best-matching gallery photo of this individual
    gallery_image: str
    stages: dict[str, float | None] = field(default_factory=dict)  # each stage's score, None: not run
    evidence: dict = field(default_factory=dict)  # e.g. keypoint inliers, for a person to check


@dataclass
class QueryResult:
    record: Record
    name: str
    predictions: list[str]
    candidates: list[Candidate]

    @property
    def confidence(self) -> float:
        return self.candidates[0].score if self.candidates else 0.0


def save_model(model: SiameseNet, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: Path, device: torch.device | None = None) -> SiameseNet:
    if not Path(path).is_file():
        raise UserError(f"{path} not found: the run folder has no model (run `cli.py train-siamese`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = SiameseNet(ModelConfig.from_dict(ckpt["config"]), load_pretrained=False)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device or torch_device()).eval()


class Engine:
    """A loaded run folder, ready to match."""

    def __init__(self, run: RunFolder, model: SiameseNet, gallery: Gallery, config: dict):
        self.run, self.model, self.gallery, self.config = run, model, gallery, config
        self.index = EmbeddingIndex(gallery.embeddings, gallery.viewpoints)

    @classmethod
    def load(cls, run_path: Path) -> "Engine":
        run = RunFolder(run_path)
        config = run.config()
        return cls(run, load_model(run.weights_path), Gallery.load(run.gallery_path), config)

    def embed(self, records: Sequence[Record], cfg: MatchConfig, progress: bool = True,
              desc: str = "embedding queries") -> EmbedResult:
        return embed_records(self.model, records, self.run.cache_dir / "embeddings.h5", cfg.batch_size,
                             cfg.workers, progress, desc)

    def tau(self, cfg: MatchConfig) -> float:
        return cfg.tau if cfg.tau is not None else DEFAULT_TAU

    def score(self, records: Sequence[Record], emb: EmbedResult, cfg: MatchConfig) -> list[QueryResult]:
        if len(emb.ok) == 0:
            return []
        recs = [records[i] for i in emb.ok]
        k = min(cfg.shortlist, len(self.gallery))
        # one extra neighbour per query so that dropping the query's own photo (evaluate on gallery
        # images) still leaves k
        sims, idx = self.index.search(emb.embeddings, k + 1, [r.viewpoint for r in recs])
        gallery_paths = np.array(self.gallery.paths)
        tau = self.tau(cfg)
        out = []
        for qi, rec in enumerate(recs):
            keep = idx[qi] >= 0
            keep &= gallery_paths[np.maximum(idx[qi], 0)] != str(Path(rec.path).resolve())
            g_idx, g_sim = idx[qi][keep][:k], sims[qi][keep][:k]
            ranked = aggregate_per_individual([self.gallery.ids[g] for g in g_idx], g_sim)
            cands = [Candidate(ind, float(s), int(g_idx[b]), self.gallery.paths[g_idx[b]], {"embedding": float(s)})
                     for ind, s, b in ranked]
            out.append(QueryResult(rec, rec.image, top5_with_new(ranked, tau), cands[:5]))
        return out


def write_predictions(results: Sequence[QueryResult], out_csv: Path, extra: dict | None = None) -> Path:
    """`image,predictions` CSV (Kaggle format) and a JSON with the same stem holding the evidence."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "predictions"])
    for r in results:
        w.writerow([r.name, " ".join(r.predictions)])
    atomic_write_bytes(out_csv, buf.getvalue().encode("utf-8"))
    json_path = Path(out_csv).with_suffix(".json")
    atomic_write_json(json_path, {
        **(extra or {}),
        "new_individual_token": NEW_INDIVIDUAL,
        "queries": [{
            "image": r.name, "path": str(r.record.path), "predictions": r.predictions,
            "candidates": [{
                "individual_id": c.individual_id, "score": round(c.score, 6), "gallery_image": c.gallery_image,
                **{f"{k}_score": None if v is None else round(float(v), 6) for k, v in c.stages.items()},
                **c.evidence,
            } for c in r.candidates],
        } for r in results],
    })
    return json_path


def build_gallery(run: RunFolder, model: SiameseNet, records: Sequence[Record], cfg: MatchConfig,
                  progress: bool = True) -> tuple[Gallery, EmbedResult]:
    """Embed the gallery photos and save gallery.h5; unreadable photos are left out and reported."""
    emb = embed_records(model, records, run.cache_dir / "embeddings.h5", cfg.batch_size, cfg.workers,
                        progress, "embedding gallery")
    if len(emb.ok) == 0:
        raise UserError("no gallery photo could be read: nothing to match against")
    gallery = Gallery.from_records([records[i] for i in emb.ok], emb.embeddings)
    gallery.save(run.gallery_path)
    return gallery, emb
