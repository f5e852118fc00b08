"""Where the animal is in a photo, for the keypoint stage: the channel norm of the last feature map
of the bundled ImageNet backbone (the *pretrained* weights, so the map, and the keypoints cached
with it, never change when the Siamese network is retrained).

Photos are cropped loosely: grass, bark and water take half the frame and give SIFT matches
between different animals photographed in similar places. Keeping only the keypoints where this
map is high lifted the raw inlier ranking's closed-set top-1 on the development set from 0.160 to
0.243 (144 known queries, their top-20 shortlists; the network trained on this data gave 0.236, so
the pretrained one is kept: no dependency on training). See keypoints.features.KeypointConfig.focus_keep.
"""
from __future__ import annotations

import threading

import cv2
import numpy as np

_NETS: dict = {}  # one network per (backbone, size) per process, built at first use
_LOCK = threading.Lock()


class FocusMap:
    """`focus(image) -> map`: a coarse float32 map (about 1/32 of the input size), higher where the
    ImageNet backbone responds (the animal). Pickles as its settings only: a Ray worker builds the
    network once, at its first photo."""

    def __init__(self, backbone: str = "mobilenetv2_100", input_size: tuple[int, int] = (288, 416)):
        self.backbone, self.input_size = backbone, tuple(input_size)

    @property
    def name(self) -> str:
        return f"{self.backbone}@{self.input_size[0]}x{self.input_size[1]}"

    def __getstate__(self) -> dict:
        return {"backbone": self.backbone, "input_size": self.input_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _net(self):
        key = (self.backbone, self.input_size)
        with _LOCK:
            if key not in _NETS:
                from siamese.model import ModelConfig, SiameseNet

                net = SiameseNet(ModelConfig(backbone=self.backbone, input_size=self.input_size, crop="none")).eval()
                _NETS[key] = net.float()  # fp32 on every machine: the same keypoints wherever they are cached
            return _NETS[key]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        from siamese.model import preprocess

        net = self._net()
        rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        x = torch.from_numpy(preprocess(rgb, net.config))[None]
        with torch.no_grad():
            f = net.backbone.forward_features(x).float()[0]
        return f.norm(dim=0).numpy().astype(np.float32)


def focus_box(focus: np.ndarray, shape: tuple[int, ...], k: float = 2.0,
              min_side: float = 0.25) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of a photo of `shape` around the animal marked by its `focus` map:
    per axis, the centre of the map's weight above its median +- `k` standard deviations, clipped
    to the photo (and at least `min_side` of its side). A flat map gives the whole photo.

    On the development set (144 known queries per seed, the trained networks of docs/measured.md, at test
    time only) the embedding's closed-set top-1 went from 0.125 / 0.146 (whole photo) to 0.153 /
    0.243 with k = 2 (69% of the area kept on average); the box of the cells above the median: 0.160
    / 0.208."""
    H, W = shape[:2]
    h, w = focus.shape
    weight = np.clip(focus.astype(np.float64) - np.median(focus), 0, None)
    if not weight.sum() > 0:
        return 0, 0, W, H
    weight /= weight.sum()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # cell centres
    out = []
    for c, n, N in ((xs, w, W), (ys, h, H)):
        mid = float((weight * c).sum())
        half = k * float(np.sqrt((weight * (c - mid) ** 2).sum()))
        lo, hi = max(0.0, mid - half), min(float(n), mid + half)
        if hi - lo < min_side * n:  # too thin: the minimum side, centred where it fits
            lo = min(max(0.0, mid - min_side * n / 2), n * (1 - min_side))
            hi = lo + min_side * n
        out.append((int(lo * N / n), int(np.ceil(hi * N / n))))
    (x0, x1), (y0, y1) = out
    return x0, y0, x1, y1


def focus_crop(rgb: np.ndarray, focus: FocusMap | None = None) -> np.ndarray:
    """The part of the photo inside its `focus_box` (the bundled ImageNet network's map by default)."""
    x0, y0, x1, y1 = focus_box((focus or FocusMap())(rgb), rgb.shape)
    return rgb[y0:y1, x0:x1]
