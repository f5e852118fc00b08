"""Local features of one photo: resize, CLAHE, SIFT, RootSIFT.

Keypoint positions are returned in the ORIGINAL image's pixel coordinates, so the matches can be
drawn on the photo a person looks at and the geometry does not depend on the working resolution.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable

import cv2
import numpy as np

log = logging.getLogger(__name__)

DESC_DIM = 128


@dataclass(frozen=True)
class KeypointConfig:
    """Settings of the extraction. Changing any of them invalidates a keypoint cache."""

    max_side: int = 512  # long side of the working image, in pixels
    upscale: bool = False  # enlarge photos smaller than max_side (adds interpolation, not detail)
    clahe_clip: float = 2.0  # 0 disables CLAHE
    clahe_grid: int = 8  # tiles per side
    # strongest in focus by SIFT response; bounds the matching cost per pair. 3000 rather than 1500
    # (engine on the development set, same networks, seeds 0 / 1): closed top-1 0.292 -> 0.333 /
    # 0.285 -> 0.326, MAP@5 0.490 -> 0.539 / 0.506 -> 0.519, at 1.7x the matching cost per pair
    max_keypoints: int = 3000
    contrast_threshold: float = 0.03  # SIFT; a little below OpenCV's 0.04 to keep faint spots
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6
    # Focus: keep only the keypoints where a focus map (siamese.focus: where an ImageNet network
    # responds, i.e. the animal) is in its top `focus_keep` share of the photo; 1 = everywhere.
    # `focus_candidates` strongest SIFT keypoints are detected first, then the strongest
    # `max_keypoints` in focus kept. On the development set (144 known queries, top-20 shortlists,
    # raw inlier ranking): whole photo 0.160 closed-set top-1 (3000 keypoints: 0.194 at 3.4x the
    # matching cost), focus 0.5: 0.243 (the trained network's map: 0.5 0.236, 0.7 0.257, within
    # noise of each other; the fixed pretrained map is used). Applied only when the extraction is given a
    # focus map (the keypoint stage gives it; a config rebuilt from a run that predates the focus
    # reads as 1: see config_from_dict).
    focus_keep: float = 0.5
    focus_candidates: int = 6000
    # Upright descriptors: every keypoint described at angle 0 instead of its dominant gradient
    # orientation (one keypoint per location and scale where SIFT would give it several), for photos
    # taken the right way up, where rotation invariance only adds ambiguity; an upright descriptor
    # still matches across the small tilts of hand-held photos (+-15-20 degrees). Off here, so that a
    # run recorded before the setting existed reads as extracted; the "default" preset turns it on.
    # Development set, the same networks, whitened as trained for each (seeds 0 / 1): the validator's
    # held-out AUC 0.701 -> 0.745 / 0.713 -> 0.754, the engine's closed top-1 0.417 -> 0.451 / 0.451 ->
    # 0.493 (keypoint stage 0.424 -> 0.431 / 0.451 -> 0.486), at ~0.84x the keypoints per photo.
    upright: bool = False


# Matching cost grows with the square of the keypoint count and dominates verification. Measured on
# 400 real nyala pairs (200 same individual + flank, 200 different; 2-core Xeon VM, one thread),
# truncating a 3000-keypoint extraction:
#   keypoints        700    1000   1500   2000   3000
#   CPU ms per pair  6.3    13.6   30.1   51.1   84.9
#   AUC raw inliers  0.542  0.555  0.582  0.608  0.661
#   AUC n_matches    0.583  0.598  0.624  0.614  0.639
# (Keypoints in focus, matching and geometry of train-verifier's pairs, 2-core AMD EPYC: 8 ms per pair
# at 1500, 14 ms at 3000.) "default" verifies a query's V=20 candidates in 0.3 s on two cores of an AVX2-only
# AMD EPYC with features cached (V=50: 0.7 s).
PRESETS: dict[str, KeypointConfig] = {
    "default": KeypointConfig(upright=True),
    # the default before upright descriptors: for photos taken at any angle (from above, rotated scans)
    "rotation-invariant": KeypointConfig(),
    # ~13x cheaper to match than the default (table above): for large shortlists or slow machines
    "fast": KeypointConfig(max_side=384, max_keypoints=700, focus_candidates=3000, upright=True),
    # the default's keypoint count from a 768-pixel working image: finer detail where the animal is a
    # small part of the frame, a dearer extraction
    "dense": KeypointConfig(max_side=768, max_keypoints=3000, upright=True),
    # the default before 3000 keypoints (and upright descriptors): ~0.6x the matching cost per pair,
    # less accurate (see max_keypoints)
    "kp1500": KeypointConfig(max_keypoints=1500, focus_candidates=3000),
}


@dataclass(frozen=True)
class Keypoints:
    """Keypoints of one image: positions in original pixels (x, y), descriptors (RootSIFT: 128 wide;
    XFeat: 64), size. Rows are ordered by decreasing detector response."""

    xy: np.ndarray  # float32 (n, 2)
    desc: np.ndarray  # float32 (n, width), each row L2-norm 1
    image_size: tuple[int, int]  # (h, w) of the original image

    def __post_init__(self) -> None:
        if self.xy.ndim != 2 or self.xy.shape[1] != 2:
            raise ValueError(f"xy must be (n, 2), got {self.xy.shape}")
        if self.desc.ndim != 2 or len(self.desc) != len(self.xy):
            raise ValueError(f"desc must be ({len(self.xy)}, width), got {self.desc.shape}")

    def __len__(self) -> int:
        return len(self.xy)

    def top(self, n: int) -> "Keypoints":
        """The n strongest keypoints (extraction stores them strongest first)."""
        return Keypoints(self.xy[:n], self.desc[:n], self.image_size)

    def to_arrays(self, desc_dtype: str = "float32") -> dict[str, np.ndarray]:
        """Plain arrays for a cache. `desc_dtype="float16"` halves storage; matching results then
        differ only in the last digits of the distances (RootSIFT values lie in [0, 1])."""
        return {
            "xy": np.ascontiguousarray(self.xy, dtype=np.float32),
            "desc": np.ascontiguousarray(self.desc, dtype=np.dtype(desc_dtype)),
            "image_size": np.asarray(self.image_size, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "Keypoints":
        """Inverse of `to_arrays`; takes any mapping of arrays (dict, h5py group, npz file)."""
        h, w = (int(v) for v in np.asarray(arrays["image_size"]).reshape(2))
        desc = np.asarray(arrays["desc"], dtype=np.float32)
        return cls(
            xy=np.asarray(arrays["xy"], dtype=np.float32).reshape(-1, 2),
            desc=desc.reshape(-1, desc.shape[-1] if desc.ndim == 2 else DESC_DIM),
            image_size=(h, w),
        )

    def in_photo(self, reduction) -> "Keypoints":
        """The same keypoints placed in the full photo that the extraction's image was decoded
        reduced from (a core.images.Reduction): positions in the full photo's pixels."""
        if reduction.scale == 1 and tuple(reduction.size) == tuple(self.image_size):
            return self
        xy = reduction.to_full(self.xy).astype(np.float32)
        return Keypoints(xy, self.desc, (int(reduction.size[0]), int(reduction.size[1])))

    @classmethod
    def empty(cls, image_size: tuple[int, int], width: int = DESC_DIM) -> "Keypoints":
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, width), np.float32),
                   (int(image_size[0]), int(image_size[1])))


def set_cv2_threads(n: int) -> None:
    """OpenCV's own thread pool. Use 1 when the caller already runs images/pairs in parallel
    threads: nested pools on a small machine only add contention."""
    cv2.setNumThreads(int(n))


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root. The result has
    unit L2 norm, so L2 distance between RootSIFT vectors is the Hellinger distance of the SIFTs."""
    d = np.asarray(desc, dtype=np.float32)
    s = d.sum(axis=1, keepdims=True)
    out = np.sqrt(d / np.maximum(s, 1e-12))
    return out.astype(np.float32, copy=False)


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx{1,3,4} (RGB[A]) to uint8 HxW."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2GRAY)
    raise ValueError(f"expected HxW or HxWx3 image, got shape {img.shape}")


def _working_image(gray: np.ndarray, cfg: KeypointConfig) -> np.ndarray:
    h, w = gray.shape
    s = cfg.max_side / max(h, w)
    if s < 1.0 or (s > 1.0 and cfg.upscale):
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        interp = cv2.INTER_AREA if s < 1.0 else cv2.INTER_CUBIC
        gray = cv2.resize(gray, (nw, nh), interpolation=interp)
    if cfg.clahe_clip > 0 and min(gray.shape) >= 2 * cfg.clahe_grid:
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_grid, cfg.clahe_grid))
        gray = clahe.apply(gray)
    return gray


def upright_keypoints(kps) -> list:
    """The keypoints at angle 0, one per location and scale (SIFT repeats a keypoint for each
    strong orientation: upright, the copies would have equal descriptors and fail the ratio test)."""
    seen, out = set(), []
    for k in sorted(kps, key=lambda k: -k.response):
        key = (round(k.pt[0], 2), round(k.pt[1], 2), round(k.size, 2))
        if key not in seen:
            seen.add(key)
            out.append(cv2.KeyPoint(k.pt[0], k.pt[1], k.size, 0.0, k.response, k.octave, k.class_id))
    return out


def extract_keypoints(image: np.ndarray, cfg: KeypointConfig = PRESETS["default"], focus=None) -> Keypoints:
    """SIFT keypoints + RootSIFT descriptors of one uint8 image (HxW gray or HxWx3 RGB); with
    `focus` (image -> coarse float map, e.g. siamese.focus.FocusMap) and cfg.focus_keep < 1, only
    those where the map is in its top focus_keep share of the photo.

    Never fails on content: a blank or tiny image gives zero keypoints."""
    focused = focus is not None and cfg.focus_keep < 1
    gray = to_gray(image)
    h, w = gray.shape
    if h == 0 or w == 0:
        return Keypoints.empty((h, w))
    work = _working_image(gray, cfg)
    wh, ww = work.shape
    # SIFT_create's nfeatures already keeps the strongest by response before computing
    # descriptors (cheaper; not when upright, below); the explicit cut makes the cap exact when
    # responses tie.
    n_detect = max(cfg.max_keypoints, cfg.focus_candidates) if focused and cfg.max_keypoints > 0 else cfg.max_keypoints
    # upright: every keypoint is detected, the copies SIFT makes for other orientations dropped, then
    # the strongest n_detect described (so that a cap counts distinct keypoints)
    sift = cv2.SIFT_create(nfeatures=0 if cfg.upright else max(0, int(n_detect)), nOctaveLayers=cfg.n_octave_layers,
                           contrastThreshold=cfg.contrast_threshold, edgeThreshold=cfg.edge_threshold,
                           sigma=cfg.sigma)
    if cfg.upright:
        kps = upright_keypoints(sift.detect(work, None))[:n_detect if n_detect > 0 else None]
        kps, desc = sift.compute(work, kps) if kps else ((), None)
    else:
        kps, desc = sift.detectAndCompute(work, None)
    if desc is None or len(kps) == 0:
        return Keypoints.empty((h, w))
    # strongest first, so that kp.top(n) of a cached set is what a cap of n would have kept
    response = np.array([k.response for k in kps], dtype=np.float32)
    keep = np.argsort(-response, kind="stable")
    pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
    # pixel centres: x_orig + 0.5 = (x_work + 0.5) * (w / ww)
    xy = np.empty_like(pts)
    xy[:, 0] = (pts[:, 0] + 0.5) * (w / ww) - 0.5
    xy[:, 1] = (pts[:, 1] + 0.5) * (h / wh) - 0.5
    if focused:
        keep = keep[in_focus(xy[keep], focus(image), (h, w), cfg.focus_keep)]
    if cfg.max_keypoints > 0:
        keep = keep[: cfg.max_keypoints]
    return Keypoints(xy=xy[keep].astype(np.float32), desc=root_sift(desc[keep]), image_size=(h, w))


def in_focus(xy: np.ndarray, focus_map: np.ndarray, image_size: tuple[int, int], share: float) -> np.ndarray:
    """Mask of the points (x, y in image pixels) where `focus_map`, stretched over the image, is in
    its top `share` of the photo's area."""
    h, w = image_size
    fmap = cv2.resize(np.asarray(focus_map, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    x = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
    y = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
    return fmap[y, x] >= np.quantile(fmap, 1.0 - share)


def extract_many(images: Iterable[np.ndarray], cfg: KeypointConfig = PRESETS["default"],
                 workers: int = 1) -> list[Keypoints]:
    """`extract_keypoints` over several images, in order, on a thread pool (SIFT releases the GIL).

    OpenCV's internal threads are set to 1 meanwhile so the two pools do not fight, then restored."""
    images = list(images)
    if workers <= 1 or len(images) <= 1:
        return [extract_keypoints(im, cfg) for im in images]
    before = cv2.getNumThreads()
    set_cv2_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda im: extract_keypoints(im, cfg), images))
    finally:
        set_cv2_threads(before)


def config_to_dict(cfg) -> dict:
    """The settings as config.json and the caches' fingerprints record them. Without focus, as a
    run from before the focus settings recorded them: its caches stay valid."""
    d = asdict(cfg)
    if d.get("focus_keep", 1.0) >= 1:
        d = {k: v for k, v in d.items() if not k.startswith("focus")}
    if not d.get("upright"):  # recorded only when on: runs from before the setting keep their caches
        d.pop("upright", None)
    return d


def config_from_dict(d: dict) -> KeypointConfig:
    """Rebuild a config saved with dataclasses.asdict (unknown keys are an error, not ignored). A
    run whose config predates the focus settings extracted from the whole photo: it keeps doing so
    (its validator was fitted on such keypoints)."""
    d = dict(d)
    d.setdefault("focus_keep", 1.0)
    return KeypointConfig(**d)


__all__ = ["KeypointConfig", "Keypoints", "PRESETS", "extract_keypoints", "extract_many",
                          "root_sift", "set_cv2_threads", "to_gray", "config_from_dict", "config_to_dict", "in_focus"]
