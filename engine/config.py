"""The settings of matching, each default defined once. Light on purpose (no torch import): the CLI
reads its defaults from here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MatchConfig:
    shortlist: int = 50  # K: gallery images proposed by the embedding index per query
    # V: gallery images per query checked by the keypoint verifier. 50 = the whole default shortlist: on
    # the development set (seeds 0/1, same networks) closed top-1 0.306/0.299 at V = 20, 0.347/0.347
    # at V = 50, at ~0.17 s more per query (0.28 -> 0.45 s, 1500 keypoints, Intel Xeon); a shortlist
    # of 100 with V = 50 was worse (0.333, seed 0). With 3000 keypoints on an AVX2-only AMD EPYC, V = 20
    # costs 0.30 s per query with features cached, V = 50 0.70 s: 20 (with --votes 0) is the setting for speed
    verify_top: int = 50
    # at most this many photos of one individual in a shortlist, its most similar ones (0: no cap): the
    # shortlist then reaches more individuals (see engine.pipeline.Engine.shortlist)
    per_individual: int = 0
    # gallery photos proposed per query by keypoint votes (keypoints.votes: LNBNN over the gallery's
    # RootSIFT descriptors), added to the shortlist and always verified; 0: the embedding's shortlist
    # only. 20 on the development set (same networks, seeds 0 / 1; AMD EPYC), with the votes fused as
    # a stage: the right animal among the shortlisted photos for 63% -> 75% of known queries (seed 0),
    # closed top-1 0.333 -> 0.396 / 0.340 -> 0.417, MAP@5 0.527 -> 0.565 / 0.522 -> 0.559, at ~0.2 s
    # of vote search and up to 20 more verifications per query (README "Measured")
    votes: int = 20
    tau: float | None = None  # None: calibration.json's, else the last ALL stage's default_tau
    batch_size: int = 32
    workers: int = 2
    matchers: tuple[str, ...] | None = None  # local matchers to use (sift, xfeat); None: all the run has
    query_expansion: int = 0  # > 0: search again with the query averaged with its best k gallery photos
    rerank: int = 0  # > 0: k-reciprocal re-ranking of the shortlist with k neighbours (ranker.rerank)


@dataclass(frozen=True)
class VerifierTrainConfig:
    keypoints: str = "default"  # keypoints.features.PRESETS
    focus: float | None = None  # share of each photo where SIFT keypoints are kept (None: the preset's focus_keep)
    verify: str = "default"  # keypoints.verify.VERIFY_PRESETS
    validator: str = "default"  # keypoints.validator.VALIDATOR_PRESETS
    matchers: tuple[str, ...] = ("sift",)  # local matchers to fit a validator for: sift, xfeat
    negatives_per_query: int = 8  # hard false pairs from the top of each query's shortlist
    max_queries: int = 600
    seed: int = 0
    workers: int = 2


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
