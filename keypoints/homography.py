"""Double homography fit between matched points, and the checks that reject impossible geometry.

Coordinates: each image's points are centred on the image centre and scaled so that its long side
measures `REF_SIDE` pixels (the "reference frame"). Thresholds are pixels of that frame, so they mean
the same thing for a 300 px and a 4000 px photo. The "unit frame" is the same with long side 1; its
homography entries are the features (identity when the two photos are framed alike).

Method choice: USAC_MAGSAC for both passes. Measured with
`python bench/verifier_speed.py --compare-methods --pairs 400` (OpenCV 4.13, default presets;
20 synthetic photos warped by random perspective H, corners moved by up to 12% of the side;
400 real nyala pairs: 200 same individual + same flank + other sighting, 200 different individuals):

| passes          | warp corner error px, median / max | failures | AUC raw inliers | AUC accepted inliers | CPU ms per double fit |
|-----------------|------------------------------------|----------|-----------------|----------------------|-----------------------|
| MAGSAC + MAGSAC | 0.15 / 0.54                        | 0 / 20   | 0.573           | 0.537                | 0.31                  |
| RANSAC + RANSAC | 0.16 / 0.67                        | 0 / 20   | 0.595           | 0.528                | 3.54                  |
| RANSAC + MAGSAC | 0.15 / 0.54                        | 0 / 20   | 0.588           | 0.528                | 3.95                  |

The AUC differences are within noise (standard error ~0.03 at 200 + 200 pairs); MAGSAC is as accurate
on the known warps and ten times cheaper, because USAC stops early (SPRT) where RANSAC runs all its
iterations on the low inlier ratios of wrong pairs. USAC also refuses orientation-reversing minimal
samples, so a mirrored pattern gets no fit at all rather than a flagged one; the `mirrored` check
still guards RANSAC configurations. Matching (faiss) costs ~30 ms per pair at 1500 keypoints, so the
fit is not the bottleneck either way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

log = logging.getLogger(__name__)

REF_SIDE = 512.0

METHODS = {
    "magsac": cv2.USAC_MAGSAC,
    "ransac": cv2.RANSAC,
    "usac": cv2.USAC_DEFAULT,
    "lmeds": cv2.LMEDS,
}


def frame_transform(image_size: tuple[int, int], side: float = REF_SIDE) -> np.ndarray:
    """3x3 matrix taking original pixel coordinates of an image (h, w) to its reference frame."""
    h, w = image_size
    s = side / max(h, w, 1)
    return np.array([[s, 0.0, -s * (w - 1) / 2.0],
                     [0.0, s, -s * (h - 1) / 2.0],
                     [0.0, 0.0, 1.0]])


def apply_h(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (n, 2) points through a homography (points at the horizon come back as inf)."""
    p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    q = p @ H[:2, :2].T + H[:2, 2]
    w = p @ H[2, :2] + H[2, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return q / w[:, None]


def reprojection_error(H: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    err = np.linalg.norm(apply_h(H, src) - dst, axis=1)
    return np.where(np.isfinite(err), err, np.inf)


def fit_homography(src: np.ndarray, dst: np.ndarray, method: str, threshold: float,
                   max_iters: int = 2000, confidence: float = 0.999) -> tuple[np.ndarray | None, np.ndarray]:
    """One robust fit. Returns (H or None, inlier mask). Never raises on degenerate input."""
    n = len(src)
    none = (None, np.zeros(n, dtype=bool))
    if n < 4:
        return none
    s = np.ascontiguousarray(src, dtype=np.float64).reshape(-1, 1, 2)
    d = np.ascontiguousarray(dst, dtype=np.float64).reshape(-1, 1, 2)
    try:
        H, mask = cv2.findHomography(s, d, METHODS[method], float(threshold),
                                     maxIters=int(max_iters), confidence=float(confidence))
    except cv2.error as e:  # e.g. all points identical
        log.debug("findHomography failed: %s", e)
        return none
    if H is None or mask is None or not np.all(np.isfinite(H)) or abs(H[2, 2]) < 1e-12:
        return none
    return H / H[2, 2], mask.ravel().astype(bool)


@dataclass(frozen=True)
class HomographyConfig:
    """Settings of the two passes (thresholds in reference-frame pixels, long side = 512)."""

    min_matches: int = 6  # fewer putative matches: do not fit at all
    min_inliers: int = 6  # fewer final inliers: no geometry (a homography fits any 4 points)
    first_method: str = "magsac"
    first_threshold: float = 20.0  # loose: flanks bend, viewpoints differ
    first_max_iters: int = 2000
    second_method: str = "magsac"
    second_threshold: float = 6.0
    second_max_iters: int = 1000
    confidence: float = 0.999
    # acceptance of the final geometry
    max_scale: float = 4.0  # |det|^0.5 of the unit-frame affine part outside [1/x, x]: rejected
    min_aniso: float = 0.25  # smaller / larger singular value of the affine part
    max_perspective: float = 1.5  # |(h20, h21)| in the unit frame
    min_spread: float = 0.02  # smaller / larger singular value of the inlier cloud (collinear)


@dataclass(frozen=True)
class Geometry:
    """Outcome of the double fit, everything in the reference frames of a and b."""

    H: np.ndarray | None  # reference frame of a -> reference frame of b
    inliers: np.ndarray  # bool mask over the input matches (final pass)
    n_first: int  # inliers of the loose pass
    errors: np.ndarray  # reprojection error (ref px) of the final inliers
    reject: str = ""  # why the geometry cannot be an animal's pattern seen again ("" = accepted)
    stats: dict = field(default_factory=dict)  # decomposed H (unit frame): det, scale, aniso, ...

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())


def decompose(H_unit: np.ndarray) -> dict:
    """Affine part of a unit-frame homography: determinant, scale, anisotropy, shear, rotation,
    perspective magnitude. `flip` is a negative determinant: a mirrored pattern."""
    A = H_unit[:2, :2] / H_unit[2, 2]
    det = float(np.linalg.det(A))
    sv = np.linalg.svd(A, compute_uv=False)
    aniso = float(sv[1] / sv[0]) if sv[0] > 0 else 0.0
    # QR-like split A = R(theta) [[sx, k], [0, sy]]: k/sx is the shear
    theta = float(np.arctan2(A[1, 0], A[0, 0]))
    sx = float(np.hypot(A[0, 0], A[1, 0]))
    shear = float((A[0, 0] * A[0, 1] + A[1, 0] * A[1, 1]) / (sx * sx)) if sx > 0 else 0.0
    return {
        "det": det,
        "scale": float(np.sqrt(abs(det))),
        "aniso": aniso,
        "shear": shear,
        "rotation": theta,
        "perspective": float(np.hypot(H_unit[2, 0], H_unit[2, 1]) / abs(H_unit[2, 2])),
        "flip": det < 0,
    }


def to_unit(H_ref: np.ndarray) -> np.ndarray:
    """Reference-frame homography (long side REF_SIDE) to unit frame (long side 1)."""
    S = np.diag([REF_SIDE, REF_SIDE, 1.0])
    Hu = np.linalg.inv(S) @ H_ref @ S
    return Hu / Hu[2, 2]


def _collinear(pts: np.ndarray, min_spread: float) -> bool:
    if len(pts) < 3:
        return True
    c = pts - pts.mean(axis=0)
    sv = np.linalg.svd(c, compute_uv=False)
    return bool(sv[0] <= 1e-9 or sv[1] / sv[0] < min_spread)


def check_geometry(H_ref: np.ndarray, src: np.ndarray, dst: np.ndarray, size_a: tuple[int, int],
                   cfg: HomographyConfig) -> tuple[str, dict]:
    """Reason to reject a fitted homography ("" if none) and its decomposition."""
    Hu = to_unit(H_ref)
    st = decompose(Hu)
    if not np.all(np.isfinite(Hu)) or abs(st["det"]) < 1e-6:
        return "singular", st
    if st["flip"]:
        return "mirrored", st
    if not (1.0 / cfg.max_scale <= st["scale"] <= cfg.max_scale):
        return "scale", st
    if st["aniso"] < cfg.min_aniso:
        return "shear", st
    if st["perspective"] > cfg.max_perspective:
        return "perspective", st
    # the whole of image a must stay on one side of the horizon line, or the mapping folds over
    h, w = size_a
    T = frame_transform(size_a)
    corners = apply_h(T, np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float))
    wd = np.concatenate([corners, src]) @ H_ref[2, :2] + H_ref[2, 2]
    if np.any(wd <= 0):
        return "horizon", st
    if _collinear(src, cfg.min_spread) or _collinear(dst, cfg.min_spread):
        return "collinear", st
    return "", st


def double_homography(src: np.ndarray, dst: np.ndarray, size_a: tuple[int, int],
                      cfg: HomographyConfig = HomographyConfig()) -> Geometry:
    """Loose robust fit on all matches, then a strict robust fit on its inliers.

    `src`, `dst` are (m, 2) reference-frame points of a and b. The final inliers are a subset of the
    first pass's. Degenerate input gives a Geometry with H None (or a non-empty `reject`), never
    an exception."""
    m = len(src)
    empty = np.zeros(m, dtype=bool)
    if m < max(4, cfg.min_matches):
        return Geometry(None, empty, 0, np.zeros(0), "too_few_matches")
    H1, in1 = fit_homography(src, dst, cfg.first_method, cfg.first_threshold,
                             cfg.first_max_iters, cfg.confidence)
    n1 = int(in1.sum())
    if H1 is None or n1 < max(4, cfg.min_inliers):
        return Geometry(None, empty, n1, np.zeros(0), "too_few_inliers" if H1 is not None else "no_fit")
    idx1 = np.flatnonzero(in1)
    H2, _ = fit_homography(src[idx1], dst[idx1], cfg.second_method, cfg.second_threshold,
                             cfg.second_max_iters, cfg.confidence)
    if H2 is None:
        return Geometry(None, empty, n1, np.zeros(0), "no_fit")
    # inliers judged by the final H itself, with the strict threshold, over the first pass's inliers
    err1 = reprojection_error(H2, src[idx1], dst[idx1])
    ok = err1 < cfg.second_threshold
    inliers = empty.copy()
    inliers[idx1[ok]] = True
    errors = err1[ok]
    if inliers.sum() < max(4, cfg.min_inliers):
        return Geometry(H2, inliers, n1, errors, "too_few_inliers", decompose(to_unit(H2)))
    reject, st = check_geometry(H2, src[inliers], dst[inliers], size_a, cfg)
    return Geometry(H2, inliers, n1, errors, reject, st)
