"""The settings of the Siamese network and of its training, each default defined once.

Light on purpose (no torch import): the CLI reads its defaults from here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Named presets: the weights file, the padding the weights were trained with and their normalisation.
BACKBONES = {
    "mobilenetv2_100": dict(weights=str(REPO / "weights" / "mobilenetv2_100_tf1qat_from_tflite.pth"),
                            pad_type="same", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

CROPS = ("focus", "none")
# what of a photo is embedded, each view's features averaged (ModelConfig.views): "box" what `crop`
# gives (the focus box, the catalog's bbox or the whole photo), "centre" the middle 80% of that box
# per side, "photo" the whole photo (or the catalog's bbox, as given)
VIEWS = ("box", "centre", "photo")


def views_problem(views: tuple[str, ...]) -> str | None:
    """What is wrong with a choice of ModelConfig.views, in words (None: nothing)."""
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        hint = " (it is spelled centre)" if "center" in unknown else ""
        return (f"{', '.join(repr(v) for v in unknown) or 'nothing'} is no view{hint}: choose one or more of "
                f"{', '.join(VIEWS)}, e.g. box,centre,photo")
    twice = sorted({v for v in views if views.count(v) > 1})
    if twice:
        return f"{', '.join(twice)} given twice: each view once"
    return None


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mobilenetv2_100"
    weights: str | None = None  # local file; None: the preset's file
    input_size: tuple[int, int] = (224, 224)  # (height, width) fed to the backbone
    mean: tuple[float, float, float] | None = None  # None: the preset's or timm's
    std: tuple[float, float, float] | None = None
    pad_type: str | None = None
    gem_p: float = 3.0
    head_hidden: int = 16
    # what of each photo the network embeds (gallery, queries, validation) when the catalog gives no
    # bbox: "focus", the box around the animal that the ImageNet backbone's response marks
    # (siamese.focus.focus_box), or "none", the whole photo (run folders from before this setting
    # read back as "none"). Training sees the whole photo either way (siamese.trainer._load_resized).
    crop: str = "focus"
    # embed each photo (gallery, queries, validation) as the mean of the pooled features of it and of its
    # mirror image, which the network never sees in training (a mirrored flank is another pattern):
    # the embedding keeps what both share, the coat's texture more than its layout. On the development
    # set (docs/measured.md, "Mirror-image embedding": the same trained network with and without, seed 0 / 1) the
    # engine's closed top-1 0.472 / 0.451 -> 0.472 / 0.507, MAP@5 0.591 / 0.602 -> 0.601 / 0.615.
    # Twice the network's work per photo embedded. Run folders from before this setting read back as
    # False.
    mirror: bool = True
    # the views of each photo (VIEWS) embedded, their features averaged (each with its mirror image's):
    # the animal at three framings, so that a photo framed tighter or looser than the gallery's still
    # meets it. Training is unchanged (it sees the whole photo's random crops); the held-out validation
    # during training embeds the box alone. On the development set (docs/measured.md, "Three views": five
    # trained networks, each with the box alone and with the three views, verified and calibrated on
    # its own) closed-set MAP@5 rose on all five (mean 0.555 -> 0.567) and known animals' top-5 on
    # four, level on one (0.614 -> 0.640); new-individual F1 fell on four (0.592 -> 0.577). Three
    # times the network's work per photo embedded. Run folders from before this setting read back
    # as ("box",).
    views: tuple[str, ...] = ("box", "centre", "photo")

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise UserError(f"crop {self.crop!r}: choose one of {', '.join(CROPS)}")
        if isinstance(self.views, str):
            raise UserError(f"views {self.views!r}: give a sequence of view names, e.g. ('box', 'centre', 'photo')")
        object.__setattr__(self, "views", tuple(self.views))
        problem = views_problem(self.views)
        if problem:
            raise UserError(f"views {','.join(self.views)}: {problem}")

    def resolved(self) -> "ModelConfig":
        preset = BACKBONES.get(self.backbone, {})
        weights = self.weights or preset.get("weights")
        if weights is None:
            raise UserError(f"backbone {self.backbone} has no bundled weights: pass --weights FILE "
                            f"(bundled: {', '.join(BACKBONES)})")
        pad = self.pad_type if self.pad_type is not None else preset.get("pad_type", "")
        mean, std = self.mean or preset.get("mean"), self.std or preset.get("std")
        if mean is None or std is None:
            import siamese.torchvision_schemas  # noqa: F401  must precede timm
            import timm

            cfg = timm.create_model(self.backbone, pretrained=False, num_classes=0).pretrained_cfg
            mean, std = mean or tuple(cfg["mean"]), std or tuple(cfg["std"])
        return ModelConfig(self.backbone, str(weights), tuple(self.input_size), tuple(mean), tuple(std), pad,
                           self.gem_p, self.head_hidden, self.crop, self.mirror, tuple(self.views))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {"crop": "none", "mirror": False, "views": ("box",), **d}  # saved before these settings: as then
        for k in ("input_size", "mean", "std", "views"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # a real budget by default (the figures of README: 20 minutes on 2 CPU cores); epochs=0 builds the
    # pretrained retrieval baseline
    epochs: int = 40
    max_minutes: float | None = 20.0
    seed: int = 0
    batch_size: int = 32
    # measured on the nyala development set (14 min, held-out validation MAP@5 from 0.31 pretrained):
    # backbone 1e-4 -> 0.33-0.37, 3e-4 -> 0.44-0.46, 1e-3 -> 0.25-0.31 (the features break down)
    lr_head: float = 3e-3
    lr_backbone: float = 3e-4
    weight_decay: float = 1e-4
    heldout_fraction: float = 0.2  # individuals kept out of training for validation and calibration
    refresh_every: int = 2  # epochs between score-matrix refreshes for the LAP miner
    noise_start: float = 2.0  # LAP noise scale K, relative to the std of the scores
    noise_end: float = 0.1
    hflip: bool = False  # a mirrored flank or fluke is a different pattern
    threads: int | None = None
    precision: str = "auto"  # auto|fp32|bf16|fp16: see siamese.precision
    mined_weight: float = 0.0  # share of the negatives' half of the loss on the LAP-mined pairs
    # where the LAP assignment runs: "epoch" = on the whole training set's score matrix (it builds the
    # batches and names each image's mined negative), "batch" = also on each batch's own cosine matrix
    # of the current forward pass (the mined pairs that carry `mined_weight` are then that batch's)
    mining: str = "epoch"
    # sub-center ArcFace on the training individuals beside the pair BCE (0 = off): its weight in the
    # loss, sub-centres per individual, additive angular margin and logit scale
    arcface_weight: float = 0.0
    arcface_subcenters: int = 3
    arcface_margin: float = 0.3
    arcface_scale: float = 30.0
    # the backbone's stem and first N stages kept as pretrained (no gradient): backward stops above
    # them, so an epoch costs less (0 = all layers train). Measured on the development set (Intel Xeon
    # with AMX, bf16, 2 cores, 20-minute budget): 3 frozen stages train at ~50 images/s against ~20, so
    # 40 epochs in 16 minutes instead of 21-22 epochs, and the engine's closed-set top-1 is 0.222 vs
    # 0.222 (seed 0) and 0.236 vs 0.194 (seed 1); the embedding alone 0.125 vs 0.132 and 0.146 vs 0.076
    freeze_blocks: int = 3
    # the network kept: the mean of the weights at the ends of the epochs from this share of the training
    # on (stochastic weight averaging; 1.0: the last epoch's), or None: the epoch with the best
    # validation MAP@5 of the held-out individuals (see docs/measured.md)
    average_from: float | None = 0.75
    # after training, fit a whitening of the embedding for the shortlist search on the gallery photos of
    # the individuals trained on (siamese.index.fit_embedding_whitening; see docs/measured.md, "Embedding whitening")
    whiten_embedding: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


PRESETS = {
    "default": TrainConfig(),
    # the built-in sample's photos are 256x192: a smaller input keeps the demo under two minutes
    "demo": TrainConfig(model=ModelConfig(input_size=(144, 192)), epochs=4, max_minutes=1.0, batch_size=24),
}
