"""The stage protocol: one way of scoring (query photo, gallery photo) pairs.

Each scoring stage (the embedding's cosine, the Siamese pair head, the SIFT verifier, any matcher
added later) is one module that implements `Stage`, and one line in engine/stages.py registers it.
The orchestrator (engine.pipeline.Engine) runs a run's stages in their registered order over each
query's shortlist: a stage of scope ALL scores every shortlisted pair, a stage of scope TOP only
V pairs of each query: the best by the score so far (the last ALL stage's), in turn with the
photos of most keypoint votes (Engine.verify_picks). The ranker knows stages
only by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from core.catalog import Record
from core.gallery import Gallery
from core.runfolder import RunFolder

ALL = "all"  # scores every pair of the shortlist
TOP = "top"  # scores V pairs of each query (V = MatchConfig.verify_top; which ones: Engine.verify_picks)


@dataclass
class PairBatch:
    """Pairs to score: pair i is (queries[query_pos[i]], gallery photo gallery_idx[i])."""
    queries: Sequence[Record]
    query_embeddings: np.ndarray  # (n_queries, D) float32
    query_pos: np.ndarray  # (n,) int: index into `queries`
    gallery_idx: np.ndarray  # (n,) int: index into the gallery
    # (n,) float: the shortlist's cosine similarity, blended with the cosine to the photo's individual's
    # mean where the match settings ask for it (engine.pipeline.Engine.pair_scores)
    similarity: np.ndarray
    votes: np.ndarray | None = None  # (n,) float: the shortlist's keypoint votes (NaN: not counted)

    def __len__(self) -> int:
        return len(self.gallery_idx)


@dataclass
class StageOutput:
    scores: np.ndarray  # (n,) float64, higher = more likely the same individual
    evidence: list[dict] | None = None  # per pair, for a person to check (e.g. keypoint inliers)


@dataclass
class StageContext:
    """What a stage may need to load itself from a run folder."""
    run: RunFolder
    config: dict  # the run's config.json
    gallery: Gallery
    model: Any = None  # the run's Siamese network
    workers: int = 2
    executor: Any = None  # core.executor.LocalExecutor or RayExecutor (None: this process)
    focus: Any = None  # image -> map of where the animal is (siamese.focus.FocusMap), for keypoint stages
    extra: dict = field(default_factory=dict)


class Stage(Protocol):
    name: str  # as it appears in calibration.json, the ablation table and the outputs (`<name>_score`)
    scope: str  # ALL or TOP
    default_tau: float  # new_individual threshold on this stage's score before `calibrate` has run

    @classmethod
    def load(cls, ctx: StageContext) -> "Stage | None":
        """The stage for this run folder, or None if the run does not have it (e.g. not trained)."""

    def config(self) -> dict:
        """Its settings (and so its cache's fingerprint)."""

    def score(self, batch: PairBatch, gallery: Gallery, progress: bool = False) -> StageOutput:
        """Scores (and evidence) for the batch's pairs, in their order. Never raises on content: an
        unreadable photo scores low."""

    # optional: `active(settings) -> bool`, whether the stage scores anything under the match settings
    # (Engine.match_settings); without it, an ALL stage always does and a TOP stage where pairs are
    # verified (--verify-top > 0). See `is_active`.


def is_active(stage, settings: dict) -> bool:
    """Whether `stage` scores anything under the match settings `settings` (Engine.match_settings):
    e.g. the votes stage only where votes are counted, a local matcher only with --verify-top > 0.
    `calibrate` fits, and `evaluate` shows, only the active stages."""
    active = getattr(stage, "active", None)
    if active is not None:
        return bool(active(settings))
    return stage.scope == ALL or settings.get("verify_top", 0) > 0
