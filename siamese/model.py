"""The Siamese network: one timm backbone, GeM pooling, L2-normalised embeddings, and a pair head.

The pair head reads `[a*b, a+b, |a-b|, (a-b)^2]` for each embedding dimension through a small
layer shared by all dimensions, then a linear layer over dimensions gives one logit for
P(same individual). Each of the four features is symmetric in a and b, so the head is too.
"""
from __future__ import annotations

import io
from pathlib import Path

import siamese.torchvision_schemas  # noqa: F401  must precede timm

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.runfolder import atomic_write_bytes
from core.runtime import torch_device
from siamese.config import BACKBONES, ModelConfig  # noqa: F401  re-exported
from siamese.precision import Precision


def decode_side(input_size: tuple[int, int]) -> int:
    """How small a large JPEG may be decoded for a network of `input_size` (core.images.load_image's
    min_side): its shorter side at 4x the input size or more. On 24-megapixel photos the features'
    cosine to the full decode's is then 0.996, near that of the same photo saved again as a JPEG at
    quality 85 (0.998); at 2x, 0.992 (bench/camera_photos.py)."""
    return 4 * max(input_size)


def preprocess(rgb: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HxWx3 uint8 -> 3xhxw float32 normalised, resized to the model's input size."""
    h, w = cfg.input_size
    interp = cv2.INTER_AREA if rgb.shape[0] > h or rgb.shape[1] > w else cv2.INTER_CUBIC
    x = cv2.resize(rgb, (w, h), interpolation=interp).astype(np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class GeM(nn.Module):
    """Generalised-mean pooling: between average (p=1) and max (p->inf) pooling, p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class PairHead(nn.Module):
    """logit = w * cos(a, b) + c + over_dims(per_feature([a*b, a+b, |a-b|, (a-b)^2])).

    The cosine term is the sum of the a*b feature over dimensions: keeping it as an explicit skip
    path, and starting the learned part at zero, makes an untrained head rank exactly like the
    embedding, so training only has to learn corrections to it."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.per_feature = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.over_dims = nn.Linear(dim, 1)
        nn.init.zeros_(self.over_dims.weight)
        nn.init.zeros_(self.over_dims.bias)
        self.cos_weight = nn.Parameter(torch.tensor(10.0))
        self.cos_bias = nn.Parameter(torch.tensor(0.0))
        self.scale = dim ** 0.5  # unit-norm inputs have per-dimension values ~1/sqrt(dim)

    def cosine_logit(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.cos_weight * (a.float() * b.float()).sum(-1) + self.cos_bias

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        cos_part = self.cosine_logit(a, b)
        a, b = a.float() * self.scale, b.float() * self.scale
        d = a - b
        x = torch.stack([a * b, a + b, d.abs(), d * d], dim=-1)  # (B, D, 4)
        return cos_part + self.over_dims(self.per_feature(x).squeeze(-1)).squeeze(-1)


class SiameseNet(nn.Module):
    def __init__(self, config: ModelConfig, load_pretrained: bool = True):
        super().__init__()
        self.config = config = config.resolved()
        try:
            self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="",
                                              **({"pad_type": config.pad_type} if config.pad_type else {}))
        except RuntimeError as e:  # timm's "Unknown model"
            raise UserError(f"unknown backbone {config.backbone!r} ({e})") from None
        if load_pretrained:
            load_backbone_weights(self.backbone, Path(config.weights))
        self.pool = GeM(config.gem_p)
        self.dim = self.backbone.num_features
        self.head = PairHead(self.dim, config.head_hidden)
        # Pooled features after ReLU are all positive, so raw cosines crowd near 1; subtracting their
        # mean spreads them out (set from the gallery, or tracked during training).
        self.register_buffer("center", torch.zeros(self.dim))
        # set per machine by siamese.precision.resolve; fp32 until then
        self.precision = Precision("fp32", channels_last=True)

    def set_precision(self, precision: Precision) -> None:
        self.precision = precision
        self.to(memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.precision.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, before centring and normalisation (what the caches store)."""
        return self.pool(self.backbone.forward_features(x))

    def normalize(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float() - self.center, dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.features(x))

    def pair_logit(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(a, b)


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"backbone weights {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read backbone weights {path} ({e.__class__.__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "fc.", "head.fc."))}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing:
        raise UserError(f"backbone weights {path} do not fit {backbone.__class__.__name__}: "
                        f"{len(missing)} missing keys, e.g. {missing[0]}")


def save_model(model: SiameseNet, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: Path, device: torch.device | None = None) -> SiameseNet:
    if not Path(path).is_file():
        raise UserError(f"{path} not found: the run folder has no model (run `cli.py train-siamese`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = SiameseNet(ModelConfig.from_dict(ckpt["config"]), load_pretrained=False)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        raise UserError(f"{path} cannot be loaded ({e.__class__.__name__}): rebuild the run with "
                        f"`cli.py train-siamese`") from None
    return model.to(device or torch_device()).eval()
