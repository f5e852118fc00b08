"""The registry of scoring stages, in the order they run (cheapest first). A run uses every stage
whose `load` finds what it needs in the run folder. Adding a stage: one module implementing
core.stage.Stage, and one line here."""
from __future__ import annotations

from typing import Sequence

from core.errors import UserError
from core.stage import ALL, TOP, StageContext
from keypoints.stage import KeypointStage, XFeatStage
from keypoints.votes import VoteStage
from siamese.stages import EmbeddingStage, PairHeadStage

STAGES = (
    # counted while shortlisting (Engine.add_votes), so the cheapest to score; first, so that the
    # pair head (or the embedding) stays the last stage that scores every pair: the score that
    # chooses the top-V photos to verify
    VoteStage,
    EmbeddingStage,
    PairHeadStage,
    KeypointStage,
    XFeatStage,
)
# the stages that are local matchers, by the name `--matchers` gives them (sift, xfeat)
MATCHERS = {cls.matcher: cls for cls in STAGES if getattr(cls, "matcher", None)}


def matcher_class(name: str):
    if name not in MATCHERS:
        raise UserError(f"unknown matcher {name!r}: choose among {', '.join(sorted(MATCHERS))}")
    return MATCHERS[name]


def load_stages(ctx: StageContext, only: Sequence[str] | None = None) -> list:
    """The run's stages (among `only`, names, if given)."""
    stages = []
    for cls in STAGES:
        if only is not None and cls.name not in only:
            continue
        stage = cls.load(ctx)
        if stage is not None:
            stages.append(stage)
        elif only is not None and cls.scope == TOP:  # a local matcher asked for by name
            raise UserError(f"--matchers {cls.matcher}: {ctx.run.path} has no verifier for it "
                            f"({cls.validator_path(ctx.run).name}); fit one with `cli.py train-verifier "
                            f"--matchers {cls.matcher}` or leave it out")
    return stages


def stage_names(matchers: Sequence[str] | None) -> list[str] | None:
    """The stages to run when only the local `matchers` named (sift, xfeat) are wanted: every
    stage that scores all pairs, and those matchers' stages. None: all the run has."""
    if matchers is None:
        return None
    return [cls.name for cls in STAGES if cls.scope == ALL] + [matcher_class(m).name for m in matchers]
