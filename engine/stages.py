"""The registry of scoring stages, in the order they run (cheapest first). A run uses every stage
whose `load` finds what it needs in the run folder. Adding a stage: one module implementing
core.stage.Stage, and one line here."""
from __future__ import annotations

from typing import Sequence

from core.stage import StageContext
from keypoints.stage import KeypointStage
from siamese.stages import EmbeddingStage, PairHeadStage

STAGES = (
    EmbeddingStage,
    PairHeadStage,
    KeypointStage,
)


def load_stages(ctx: StageContext, only: Sequence[str] | None = None) -> list:
    """The run's stages (among `only`, names, if given)."""
    stages = []
    for cls in STAGES:
        if only is not None and cls.name not in only:
            continue
        stage = cls.load(ctx)
        if stage is not None:
            stages.append(stage)
    return stages
