"""Learned whitening of RootSIFT descriptors for one catalog (Mikolajczyk & Matas 2007, "Improving
descriptors for fast tree matching by optimal linear projection"; Radenovic et al. 2016 learned the
same for CNN features).

RootSIFT compares descriptors by plain L2 distance, as if every direction mattered as much. Between
two sightings of the same flank, light, season and pose move a correct match's descriptors in
directions that are not random. `train-verifier` collects correct correspondences (inliers of
accepted homographies between same-flank photos of the same training individual), and

    P = eigvecs(cov(C_S^-1/2 (d - mean)))^T  C_S^-1/2,   C_S = cov(d_a - d_b) over the correspondences

shrinks the directions in which a correct match differs and keeps the ones that tell photos apart.
Matching, votes and geometry then run on `P (d - mean)`, L2-normalised, with the same ratio test.
Development set (the same networks with and without, docs/measured.md, seeds 0 / 1): the keypoint
stage's closed top-1 0.403 -> 0.424 / 0.389 -> 0.451, the validator's held-out AUC 0.671 -> 0.701 /
0.657 -> 0.713, at no cost per query.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

import core.whitening
from core.whitening import whitening_from_differences
from keypoints.features import Keypoints
from keypoints.matching import match_descriptors


@dataclass(frozen=True)
class WhiteningConfig:
    """How `train-verifier` fits the whitening."""

    min_correspondences: int = 2000  # fewer: the covariance is too noisy, descriptors stay as extracted
    eps: float = 1e-3  # eigenvalues of C_S below eps * the largest are raised to it (regularisation)
    match_ratio: float = 0.95  # looser than matching's, to collect the harder correct matches too
    inlier_px: float = 5.0  # a putative match within this many pixels of where H puts it is correct
    sample_per_photo: int = 300  # descriptors per training photo for the mean and the second covariance
    max_pairs: int = 4000  # same-flank photo pairs verified to find correspondences (the first ones by photo order)


class Whitening(core.whitening.Whitening):
    """`apply(desc)` = rows of `P (desc - mean)`, each L2-normalised (`core.whitening`), and the same on
    a photo's keypoints."""

    def keypoints(self, kp: Keypoints) -> Keypoints:
        return Keypoints(kp.xy, self.apply(kp.desc), kp.image_size)

    def extractor(self, extract: Callable) -> Callable:
        """`extract(image) -> Keypoints`, whitened."""
        return lambda image: self.keypoints(extract(image))


def fit_whitening(desc_a: np.ndarray, desc_b: np.ndarray, sample: np.ndarray, eps: float = 1e-3) -> Whitening:
    """The whitening from correct correspondences (rows of desc_a match rows of desc_b) and a sample
    of all descriptors (for the mean and the directions that tell photos apart)."""
    if len(desc_a) != len(desc_b) or len(desc_a) < 2:
        raise ValueError(f"need two equally long sets of matching descriptors, got {len(desc_a)} and {len(desc_b)}")
    return whitening_from_differences(np.asarray(desc_a, np.float64) - np.asarray(desc_b, np.float64), sample, eps,
                                      cls=Whitening)


def correct_matches(kp_a: Keypoints, kp_b: Keypoints, H: np.ndarray, ratio: float, px: float) -> np.ndarray:
    """(m, 2) indices of putative matches (ratio test, mutual) that H maps to within px pixels."""
    m = match_descriptors(kp_a.desc, kp_b.desc, ratio=ratio, mutual=True)
    if not len(m):
        return np.zeros((0, 2), np.int64)
    pa = kp_a.xy[m.idx[:, 0]].reshape(-1, 1, 2).astype(np.float64)
    proj = cv2.perspectiveTransform(pa, np.asarray(H, np.float64)).reshape(-1, 2)
    ok = np.linalg.norm(proj - kp_b.xy[m.idx[:, 1]], axis=1) < px
    return m.idx[ok]


def same_flank_pairs(ids: Sequence[str], viewpoints: Sequence[str], limit: int) -> list[tuple[int, int]]:
    """Index pairs of photos of the same individual and viewpoint (an empty viewpoint meets any)."""
    groups: dict[str, list[int]] = {}
    for i, ident in enumerate(ids):
        groups.setdefault(ident, []).append(i)
    pairs = []
    for members in groups.values():
        for i, j in itertools.combinations(members, 2):
            if not viewpoints[i] or not viewpoints[j] or viewpoints[i] == viewpoints[j]:
                pairs.append((i, j))
    return pairs[:limit]
