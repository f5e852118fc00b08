"""train-siamese: build a run folder from a catalog; with epochs > 0, train the Siamese network.

Epochs 0 is the retrieval baseline: the pretrained backbone with GeM pooling, nothing trained.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.catalog import Catalog, load_catalog
from engine.pipeline import MatchConfig, build_gallery, save_model
from engine.runfolder import RunFolder, atomic_write_json
from engine.runtime import seed_everything, set_threads, torch_device
from siamese.model import ModelConfig, SiameseNet
from siamese.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 0
    max_minutes: float | None = None
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


PRESETS = {
    "default": TrainConfig(),
    # the built-in sample's photos are 256x192: a smaller input keeps the demo under two minutes
    "demo": TrainConfig(model=ModelConfig(input_size=(144, 192)), epochs=4, max_minutes=1.0, batch_size=24),
}


def choose_heldout(catalog: Catalog, fraction: float, seed: int) -> list[str]:
    """Individuals held out of training: drawn among those with >= 2 photos, so they can be queried."""
    counts: dict[str, int] = {}
    for r in catalog.records:
        counts[r.individual_id] = counts.get(r.individual_id, 0) + 1
    eligible = sorted(i for i, n in counts.items() if n >= 2)
    rng = random.Random(seed)
    rng.shuffle(eligible)
    return sorted(eligible[: int(round(len(eligible) * fraction))])


def train_siamese(catalog_csv: Path, out: Path, cfg: TrainConfig, images_dir: Path | None = None,
                  resume: bool = False, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    catalog = load_catalog(catalog_csv, images_dir)
    run = RunFolder(out)
    for stale in (run.verifier_path, run.calibration_path):
        if stale.exists():  # fitted on the previous network's scores
            log.warning("removing %s: it was fitted for the previous network (run train-verifier and "
                        "calibrate again)", stale)
            stale.unlink()
    model_cfg = cfg.model.resolved()
    cfg = replace(cfg, model=model_cfg)
    run.create({"catalog": str(Path(catalog_csv).resolve()),
                "images": str(Path(images_dir).resolve()) if images_dir else None,
                "train": cfg.to_dict()})
    heldout = choose_heldout(catalog, cfg.heldout_fraction, cfg.seed)
    atomic_write_json(run.heldout_path, {"individuals": heldout, "seed": cfg.seed})
    model = SiameseNet(model_cfg).to(torch_device())
    run.update_config(precision=resolve_precision(model, cfg.precision))
    summary: dict = {"epochs_trained": 0}
    if cfg.epochs > 0:
        from siamese.trainer import fit

        summary = fit(model, catalog, set(heldout), cfg, run, resume=resume, progress=progress)
    gallery, emb = build_gallery(run, model, catalog.records, MatchConfig(batch_size=cfg.batch_size), progress,
                                 set_center=cfg.epochs == 0)
    save_model(model, run.weights_path)
    summary.update({
        "gallery_photos": len(gallery), "gallery_individuals": len(set(gallery.ids)),
        "skipped": [{"image": r.image, "line": r.line, "reason": msg} for r, msg in emb.skipped],
        "embed_images_per_second": round(emb.images_per_second, 1), "seconds": round(time.perf_counter() - t0, 1),
    })
    run.update_metrics("train_siamese", summary)
    return summary
