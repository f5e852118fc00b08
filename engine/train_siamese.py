"""train-siamese: build a run folder from a catalog; with epochs > 0, train the Siamese network.

Epochs 0 is the retrieval baseline: the pretrained backbone with GeM pooling, nothing trained.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

from core.catalog import IMAGE_SUFFIXES, Catalog, load_catalog, queryable, warn_lookalikes
from core.errors import UserError
from core.gallery import Gallery
from core.runfolder import RunFolder, atomic_write_json, read_json
from core.runtime import seed_everything, set_threads, torch_device
from engine.calibrate import CalibrateConfig, epoch_chosen, heldout_fraction_needed, individuals_needed
from engine.pipeline import MatchConfig, build_gallery
from engine.stages import MATCHERS
from siamese.index import MIN_WHITENING_PHOTOS, fit_embedding_whitening
from siamese.model import SiameseNet, save_model
from siamese.precision import resolve as resolve_precision
from siamese.trainer import PRESETS, TrainConfig, fit  # noqa: F401  PRESETS: the command's presets

log = logging.getLogger(__name__)


def choose_heldout(catalog: Catalog, fraction: float, seed: int) -> list[str]:
    """Individuals held out of training: drawn among the `queryable` ones (core.catalog)."""
    eligible = queryable(r.individual_id for r in catalog.records)
    rng = random.Random(seed)
    rng.shuffle(eligible)
    return sorted(eligible[: int(round(len(eligible) * fraction))])


def heldout_roles(heldout: list[str], epochs: int, average_from: float | None) -> tuple[list[str], list[str]]:
    """(validation, calibration) individuals among the (sorted) held-out ones, for a training of
    `epochs` keeping `average_from` (TrainConfig's, or a run folder's recorded ones). A trained network is
    validated on the smaller half after each epoch. Where they choose its epoch (`epoch_chosen`),
    calibration gets only the others, so that tau is never fitted on individuals that picked the
    network; averaged weights are chosen by none, so every held-out individual calibrates (twice as
    many: on seven development networks MAP@5 0.622 -> 0.626, new-individual F1 0.571 -> 0.580, not
    on every network; docs/measured.md)."""
    validation = heldout[1::2] if epochs > 0 else []
    calibration = sorted(set(heldout) - set(validation)) if epoch_chosen(epochs, average_from) else sorted(heldout)
    return validation, calibration


def warn_few_calibration_individuals(catalog: Catalog, calibration: list[str], cfg: TrainConfig) -> None:
    """Before training: say so when `calibrate` will find too few held-out individuals to run, and
    which --heldout-fraction would give them (an untrained run can still match, uncalibrated)."""
    need = individuals_needed(CalibrateConfig())
    if len(calibration) >= need:
        return
    eligible = len(queryable(r.individual_id for r in catalog.records))
    log.warning("--heldout-fraction %g leaves %d individual(s) to calibrate on; calibrate needs %d: with %d "
                "individuals of 2 or more photos, --heldout-fraction %.2f gives them", cfg.heldout_fraction,
                len(calibration), need, eligible,
                heldout_fraction_needed(eligible, epoch_chosen(cfg.epochs, cfg.average_from)))


# settings a resumed training may change: its budget and how this machine runs it
RESUMABLE = frozenset({"epochs", "max_minutes", "threads", "precision", "whiten_embedding"})


def check_resume(run: RunFolder, cfg: TrainConfig, heldout: list[str]) -> None:
    """`--resume` continues the same training: refuse other split settings or another held-out set
    (a network trained on the old split would then be calibrated on individuals it trained on), and
    any other training setting (frozen stages, learning rates, loss, input size...), which would
    silently make the run half one recipe and half another. The budget may change."""
    from_scratch = not run.checkpoint_path.is_file()
    # without a checkpoint (killed before the first one) what the run recorded still says which training
    # this is: checked before the warning below, so that a refusal never follows it
    if not from_scratch or run.config_path.is_file():
        refuse_other_training(run, cfg, heldout)
    if from_scratch:
        log.warning("--resume: no checkpoint in %s, training starts from scratch", run.path)


def refuse_other_training(run: RunFolder, cfg: TrainConfig, heldout: list[str]) -> None:
    """`check_resume`'s refusals: other split settings, another recipe, another held-out set."""
    old = run.config().get("train", {})
    new = json.loads(json.dumps(cfg.to_dict()))  # tuples as the JSON lists of the run folder
    split = ("seed", "heldout_fraction")  # compared even where the old run did not record them
    keys = list(split) + sorted(k for k in new if k in old and k not in RESUMABLE | {"model", *split})
    changed = [(k, new[k], old.get(k)) for k in keys if old.get(k) != new[k]]
    was_model = {"crop": "none", **old.get("model", {})}  # crop: the whole photo before the setting existed
    changed += [(k, new["model"][k], was_model[k]) for k in ("backbone", "input_size", "gem_p", "head_hidden", "crop")
                if k in was_model and was_model[k] != new["model"][k]]
    if changed:
        key, value, was = changed[0]
        show = (lambda v: "x".join(map(str, v))) if key == "input_size" else str
        raise UserError(f"--resume with --{key.replace('_', '-')} {show(value)}, but {run.path} was trained with "
                        f"{show(was)}: resume with the same settings, or train anew into another --out")
    if run.heldout_path.is_file() and sorted(read_json(run.heldout_path)["individuals"]) != sorted(heldout):
        raise UserError(f"--resume: the catalog's held-out individuals differ from those of {run.path} (the "
                        f"catalog changed): train anew into another --out")


def write_embedding_whitening(run: RunFolder, gallery: Gallery, heldout: set[str], fit: bool) -> dict:
    """With `fit`, the embedding's whitening for search (siamese.index), fitted on the gallery photos of
    the individuals not held out (those calibrate and validate are never fitted on), saved in the run
    folder; without, or when they are too few, none (a previous one removed). What was done, for the
    metrics."""
    members = [i for i, ident in enumerate(gallery.ids) if ident not in heldout]
    whitening = None
    if fit:
        whitening = fit_embedding_whitening(gallery.embeddings[members], [gallery.ids[i] for i in members],
                                            [gallery.viewpoints[i] for i in members])
        if whitening is None:
            log.warning("too few photos of the training individuals in groups of two or more of one individual "
                        "and viewpoint (%d needed) to whiten the embedding: searched as it is",
                        MIN_WHITENING_PHOTOS)
    if whitening is None:
        run.embedding_whitening_path.unlink(missing_ok=True)
        return {"fitted": False}
    whitening.save(run.embedding_whitening_path)
    return {"fitted": True, "photos": len(members), "differences": whitening.correspondences}


@dataclass(frozen=True)
class Paths:
    catalog: Path  # labelled catalog CSV
    out: Path  # run folder to create (or resume)
    images: Path | None = None  # image root (default: the catalog's folder)


def enrolled_rows(run: RunFolder) -> int:
    """How many photos `enroll` added to the run's gallery (rows of enrolled.csv)."""
    if not run.enrolled_path.is_file():
        return 0
    with open(run.enrolled_path, encoding="utf-8") as f:
        return max(0, sum(1 for _ in f) - 1)  # rows after the header


def set_aside_enrolled(run: RunFolder) -> None:
    """train-siamese (--overwrite, or --resume of a trained run) builds the gallery from --catalog
    alone: the rows of the photos enrolled into the previous gallery move to a file of their own
    (enroll --catalog takes it as it is), so that enrolled.csv keeps saying what the gallery holds
    and nothing is lost."""
    if not run.enrolled_path.is_file():
        return
    n = enrolled_rows(run)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = next(p for k in range(1, 10**6)
                 if not (p := run.path / f"enrolled-before-retraining-{stamp}{'' if k == 1 else f'-{k}'}.csv").exists())
    os.replace(run.enrolled_path, aside)
    if n:
        log.warning("the previous gallery had %d enrolled photo(s); the new one has them only if --catalog lists "
                    "them. Their rows are in %s (`python cli.py enroll --catalog %s --run %s` adds them again)", n,
                    aside, shlex.quote(str(aside)), shlex.quote(str(run.path)))


def check_run_folder(run: RunFolder) -> None:
    """--out is never a folder of photos (e.g. the catalog's own), which the run's files and caches
    would be written among. Other files are no reason to refuse: a log the shell opened there first
    (`> runs/r1/train.log`), notes, a file manager's leftovers. A run folder (what it holds from its
    first moments: config.json first; a killed training may have left only its checkpoint or caches)
    is checked by the callers."""
    out = run.path
    marks = (run.config_path, run.heldout_path, run.checkpoint_path, run.weights_path, run.gallery_path,
             run.cache_dir)
    if not out.is_dir() or any(m.exists() for m in marks):
        return
    photos = sorted(p.name for p in out.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if photos:
        raise UserError(f"--out {out} holds photos ({', '.join(photos[:3])}{', ...' if len(photos) > 3 else ''}) "
                        f"and is not a run folder: give a new or empty folder for the run")


def check_not_trained(run: RunFolder) -> None:
    """Without --resume or --overwrite, a folder that already holds a trained run, or a training
    that was interrupted, is not replaced."""
    if not run.weights_path.is_file():
        if run.checkpoint_path.is_file():
            raise UserError(f"--out {run.path} holds an interrupted training (checkpoint.pt): --resume continues "
                            f"it from its last finished epoch, --overwrite starts over; or give another --out")
        return
    n = enrolled_rows(run)
    lost = f" (its {n} enrolled photo(s) would be dropped unless they are in --catalog)" if n else ""
    raise UserError(f"--out {run.path} already holds a trained run (siamese.pt): --overwrite replaces it{lost}, "
                    f"--resume continues an interrupted training; or give another --out")


def main(cfg: TrainConfig, paths: Paths, resume: bool = False, progress: bool = True,
         overwrite: bool = False, refit: str = "run train-verifier and calibrate again") -> dict:
    """The train-siamese command: a run folder from a labelled catalog, the network trained
    (cfg.epochs > 0) or pretrained (0), the gallery embedded. `refit`: what the user does about the
    verifier and calibration of an earlier network, which are removed (the demo fits them itself)."""
    catalog_csv, out, images_dir = paths.catalog, paths.out, paths.images
    t0 = time.perf_counter()
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    if Path(out).is_file():
        raise UserError(f"--out {out} is a file: give the run folder to create")
    run = RunFolder(out)
    check_run_folder(run)
    catalog = load_catalog(catalog_csv, images_dir)
    warn_lookalikes(catalog.individuals(), where=str(catalog_csv))
    heldout = choose_heldout(catalog, cfg.heldout_fraction, cfg.seed)
    model_cfg = cfg.model.resolved()
    if not Path(model_cfg.weights).is_file():  # said before anything in --out changes
        given = ("--weights" if cfg.model.weights
                 else "the bundled ones: is the installation complete? or pass --weights")
        raise UserError(f"backbone weights {model_cfg.weights} not found ({given})")
    recorded_precision = None
    if resume:
        check_resume(run, cfg, heldout)
        # the resumed epochs and the gallery run in the precision the checkpoint was trained in (measured
        # or given by --precision), not in a new first-use measurement's choice, which timing noise can
        # flip on a CPU with bf16; on another CPU, auto measures again
        recorded_precision = run.config().get("precision") if run.config_path.is_file() else None
    elif not overwrite:
        check_not_trained(run)
    set_aside_enrolled(run)  # (nothing to do for a new run folder)
    # fitted on the previous network's scores: every matcher's validator and model of inliers, the calibration
    stale_files = [p for cls in MATCHERS.values() for p in (cls.validator_path(run), cls.inlier_weights_path(run))]
    if not resume and run.checkpoint_path.exists():  # an earlier training's: never resumed into this one
        log.info("removing %s: the checkpoint of the training --overwrite replaces", run.checkpoint_path)
        run.checkpoint_path.unlink()
    for stale in stale_files + [run.calibration_path]:
        if stale.exists():
            log.warning("removing %s: it was fitted for the previous network (%s)", stale, refit)
            stale.unlink()
    # fitted for the previous network's embeddings; fitted again after the gallery (a killed run keeps none)
    run.embedding_whitening_path.unlink(missing_ok=True)
    cfg = replace(cfg, model=model_cfg)
    root = Path(images_dir if images_dir is not None else Path(catalog_csv).parent).resolve()
    run.create({"catalog": str(Path(catalog_csv).resolve()),
                "images": str(Path(images_dir).resolve()) if images_dir else None,
                # gallery.h5 stores photo paths relative to this root, found again after a move
                "images_root": str(root), "images_root_from_run": os.path.relpath(root, Path(out).resolve()),
                "train": cfg.to_dict()})
    validation, calibration = heldout_roles(heldout, cfg.epochs, cfg.average_from)
    atomic_write_json(run.heldout_path, {"individuals": heldout, "validation": validation,
                                         "calibration": calibration, "seed": cfg.seed})
    warn_few_calibration_individuals(catalog, calibration, cfg)
    model = SiameseNet(model_cfg).to(torch_device())
    run.update_config(precision=resolve_precision(model, cfg.precision, recorded_precision, keep_given=resume))
    summary: dict = {"epochs_trained": 0}
    if cfg.epochs > 0:
        summary = fit(model, catalog, set(heldout), cfg, run, resume=resume, progress=progress,
                      validation=set(validation))
    gallery, emb = build_gallery(run, model, catalog.records, MatchConfig(batch_size=cfg.batch_size), progress,
                                 set_center=cfg.epochs == 0)
    save_model(model, run.weights_path)
    summary["embedding_whitening"] = write_embedding_whitening(run, gallery, set(heldout), cfg.whiten_embedding)
    summary.update({
        "gallery_photos": len(gallery), "gallery_individuals": len(set(gallery.ids)),
        "skipped": [{"image": r.image, "line": r.line, "reason": msg} for r, msg in emb.skipped],
        "embed_images_per_second": round(emb.images_per_second, 1), "seconds": round(time.perf_counter() - t0, 1),
    })
    run.update_metrics("train_siamese", summary)
    return summary
