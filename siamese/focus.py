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

                net = SiameseNet(ModelConfig(backbone=self.backbone, input_size=self.input_size)).eval()
                _NETS[key] = net.float()  # fp32 on every machine: the same keypoints wherever they are cached
            return _NETS[key]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        from siamese.embed import preprocess

        net = self._net()
        rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        x = torch.from_numpy(preprocess(rgb, net.config))[None]
        with torch.no_grad():
            f = net.backbone.forward_features(x).float()[0]
        return f.norm(dim=0).numpy().astype(np.float32)
