"""The settings of matching, each default defined once. Light on purpose (no torch import): the CLI
reads its defaults from here."""
from __future__ import annotations

from dataclasses import dataclass, replace

# `calibrate`'s share of the embedding stage's score that is the query's cosine to the mean of the
# candidate individual's gallery photos of that viewpoint (the rest: its cosine to the photo). On the
# development set, against weight 0 on the same networks (protocol seeds 0 / 1, AMD EPYC fp32, V = 50):
# two fresh networks, MAP@5 0.603 -> 0.617 / 0.626 -> 0.627, new F1 0.571 -> 0.583 / 0.580 -> 0.580,
# closed top-1 0.472 -> 0.486 / 0.542 -> 0.549, known top-5 0.639 -> 0.646 / 0.674 -> 0.660; on two earlier
# ones, where 0.5 and 0.75 were worse or mixed, MAP@5 +0.007 / +0.012, new F1 +0.020 / +0.018 (docs/measured.md)
INDIVIDUAL_WEIGHT = 0.25
# `calibrate`'s vote weighting (MatchConfig.vote_weights): keypoint votes weighted by the model of inliers
# where the run has one. Development set, the same verified networks calibrated both ways (seeds 0 / 1, AMD
# EPYC fp32): known top-5 0.646 -> 0.694 / 0.660 -> 0.688, MAP@5 0.646 -> 0.673 / 0.662 -> 0.658, closed
# top-1 0.528 -> 0.542 / 0.590 -> 0.583, new F1 0.597 -> 0.619 / 0.601 -> 0.584 (docs/measured.md, "Votes
# weighted by the model of inliers")
VOTE_WEIGHTS = True


@dataclass(frozen=True)
class MatchConfig:
    shortlist: int = 50  # K: gallery images proposed by the embedding index per query
    # V: gallery images per query checked by the keypoint verifier, the pair head's best in turn with the
    # photos of most keypoint votes (Engine.verify_picks). Development set, seeds 0 / 1, same networks,
    # votes 20, Intel Xeon (bf16): closed top-1 0.396 / 0.417 at V = 20 (0.28 s per query with features
    # cached), 0.417 / 0.431 at V = 50 (0.52 s); without votes 0.285 / 0.306 and 0.361 / 0.361. A
    # shortlist of 100 with V = 50 was worse (seed 0, before votes). 20 is the setting for speed. Fresh
    # networks on an AMD EPYC (bf16), V = 50: 0.444 / 0.410; per query 0.41 s at V = 20, 0.86 s at 50
    verify_top: int = 50
    # at most this many photos of one individual in a shortlist, its most similar ones (0: no cap): the
    # shortlist then reaches more individuals (see engine.pipeline.Engine.shortlist)
    per_individual: int = 0
    # gallery photos proposed per query by keypoint votes (keypoints.votes: LNBNN over the gallery's
    # RootSIFT descriptors), added to the shortlist, where they take every other one of the V checks;
    # 0: the embedding's shortlist only. 20 on the development set (same networks, seeds 0 / 1, V = 50,
    # Intel Xeon), with the votes fused as a stage: closed top-1 0.361 -> 0.417 / 0.361 -> 0.431, MAP@5
    # 0.536 -> 0.570 / 0.539 -> 0.560, at 0.08 s of vote search per query (docs/measured.md)
    votes: int = 20
    # after verification, the photos (of the query's viewpoint) of the N individuals whose verified photos
    # scored best that were not verified are verified too, up to engine.pipeline.COMPLETE_PHOTOS each; those
    # not in the shortlist join it, scored by every stage (Engine.complete); 0: none. Off by default:
    # development set, same networks, seeds 0 / 1, N = 5, each calibrated with it: new F1 0.619 -> 0.622 /
    # 0.584 -> 0.604, closed top-1 0.542 -> 0.542 / 0.583 -> 0.590, but known top-5 0.694 -> 0.688 / 0.688 ->
    # 0.674, and 0.40 -> 0.70 s per query at V = 20 (docs/measured.md)
    complete: int = 0
    tau: float | None = None  # None: calibration.json's, else the last ALL stage's default_tau
    batch_size: int = 32
    workers: int = 2
    matchers: tuple[str, ...] | None = None  # local matchers to use (sift, xfeat); None: all the run has
    query_expansion: int = 0  # > 0: search again with the query averaged with its best k gallery photos
    rerank: int = 0  # > 0: k-reciprocal re-ranking of the shortlist with k neighbours (ranker.rerank)
    # share of the embedding stage's score that is the cosine to the mean of the candidate's individual's
    # photos of that viewpoint (Engine.individual_weight). A calibrated setting: None is the calibration's
    # (0 for calibrations from before it, and without calibration), and INDIVIDUAL_WEIGHT for `calibrate`
    individual_weight: float | None = None
    # keypoint votes weighted by the model of inliers (keypoints.votes; where train-verifier fitted one). A
    # calibrated setting like the individual weight: None is the calibration's (False for calibrations from
    # before it; True without calibration), and VOTE_WEIGHTS for `calibrate`
    vote_weights: bool | None = None

    def to_fit(self) -> "MatchConfig":
        """These settings as `calibrate` fits them: an individual weight of None is INDIVIDUAL_WEIGHT, a
        vote weighting of None VOTE_WEIGHTS."""
        return replace(self, individual_weight=INDIVIDUAL_WEIGHT if self.individual_weight is None
                       else self.individual_weight,
                       vote_weights=VOTE_WEIGHTS if self.vote_weights is None else self.vote_weights)


@dataclass(frozen=True)
class VerifierTrainConfig:
    keypoints: str = "default"  # keypoints.features.PRESETS
    focus: float | None = None  # share of each photo where SIFT keypoints are kept (None: the preset's focus_keep)
    verify: str = "default"  # keypoints.verify.VERIFY_PRESETS
    validator: str = "default"  # keypoints.validator.VALIDATOR_PRESETS
    matchers: tuple[str, ...] = ("sift",)  # local matchers to fit a validator for: sift, xfeat
    # learn a whitening of the SIFT descriptors from the training individuals' correct matches
    # (keypoints.whitening); False: match RootSIFT as extracted
    whitening: bool = True
    # learn which inliers tell individuals apart (keypoints.inlier_weights): the validator reads the mean
    # and sum of their weight beside the geometry; False: the geometry alone
    inlier_weights: bool = True
    negatives_per_query: int = 8  # hard false pairs from the top of each query's shortlist
    # training photos used as queries (each gives up to 2 true and `negatives_per_query` false pairs); all
    # of them up to this many. Development set, same networks, seeds 0 / 1 (Intel Xeon, bf16), 600 -> 2000
    # (every eligible photo, ~1100: 5783 -> 9840 / 5770 -> 9730 pairs, 1.7x the verifier's fitting time here;
    # up to 3.3x on a catalog of 2000 eligible photos or more): new-individual
    # F1 0.594 -> 0.613 / 0.594 -> 0.621, MAP@5 0.664 -> 0.673 / 0.670 -> 0.685, known top-5 0.688 -> 0.688
    # / 0.715 -> 0.722, closed top-1 0.556 -> 0.556 / 0.583 -> 0.576 (docs/measured.md)
    max_queries: int = 2000
    seed: int = 0
    workers: int = 2


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
