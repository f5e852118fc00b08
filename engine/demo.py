"""demo: the whole path on a sample that needs nothing outside the repo (or on the user's photos)."""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from core.catalog import load_catalog, queryable
from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL
from core.runfolder import RunFolder
from engine import calibrate, train_siamese, train_verifier
from engine.config import DemoConfig, MatchConfig, VerifierTrainConfig
from engine.evaluate import save_evaluation
from engine.matching import evaluate_pairs, evaluate_results, format_metrics, match_pairs
from engine.pipeline import Engine, write_predictions
from engine.review import write_review
from engine.synthetic import make_dataset, split_open_set

# The built-in sample: small enough to run end to end in under two minutes on 2 CPU cores.
SAMPLE = dict(n_individuals=30, photos_per_individual=6, size=(192, 256))
SAMPLE_UNSEEN = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    out: Path  # everything the demo writes goes here
    catalog: Path | None = None  # your own labelled photos instead of the built-in sample
    images: Path | None = None


# held out of training: one calibration individual per fold of calibrate (the demo's settings), also
# where train-siamese gives every other held-out individual to choosing the epoch (heldout[1::2],
# TrainConfig.average_from=None): 5 (with averaged weights, the default, all five calibrate)
MIN_HELDOUT = calibrate.heldout_needed(chosen=True)
# the demo has no --heldout-fraction or --new-rate: what calibrate's warning about few held-out
# individuals advises here instead
DEMO_REMEDY = ("expected in the demo (it holds out a fifth of the individuals, at least the few that calibrate "
               "needs); to calibrate on more, run the commands one by one (train-siamese --heldout-fraction, "
               "calibrate --new-rate)")
MIN_TRAINING = 5


def unseen_of(n_individuals: int) -> int:
    """Individuals of your own catalog the demo keeps aside as new animals."""
    return max(1, n_individuals // 5)


def smallest_catalog() -> int:
    """The fewest individuals (each with a query photo and two gallery photos) the demo can run on."""
    return next(n for n in range(2, 1000) if n - unseen_of(n) >= MIN_HELDOUT + MIN_TRAINING)


def heldout_fraction(gallery_csv: Path, default: float, n_unseen: int, catalog: Path) -> float:
    """The share of the gallery's individuals the demo holds out of training for a catalog of your
    own: the usual share where it gives MIN_HELDOUT individuals, more where it would give fewer;
    an error naming the catalog where the gallery is too small for both."""
    eligible = len(queryable(r.individual_id for r in load_catalog(gallery_csv).records))
    if eligible < MIN_HELDOUT + MIN_TRAINING:
        raise UserError(f"demo --catalog {catalog}: after {n_unseen} individual(s) are kept aside as new animals "
                        f"and a photo of the others as queries, the gallery has {eligible} individual(s) with 2 or "
                        f"more photos; the demo needs at least {MIN_HELDOUT + MIN_TRAINING} ({MIN_HELDOUT} held out "
                        f"of training to validate and calibrate on, {MIN_TRAINING} or more to train on). "
                        f"A catalog of {smallest_catalog()} or more individuals with 3 or more photos each is enough "
                        f"(which individuals are kept aside depends on --seed)")
    return max(default, MIN_HELDOUT / eligible)


def check_replaceable(run: Path, gallery_csv: Path) -> None:
    """The demo replaces the run of an earlier demo in the same --out (photos enrolled into it are set
    aside by train-siamese, with a warning), never a run that something else trained there. A demo's
    run says so in config.json (`made_by`, kept when the folder moves); one of an engine that did not
    record it, by its catalog: this --out's split."""
    folder = RunFolder(run)
    if not folder.weights_path.is_file():
        return
    try:
        config = json.loads(folder.config_path.read_text(encoding="utf-8"))
        made_by, made_from = config.get("made_by"), config.get("catalog")
    except (OSError, ValueError, AttributeError):
        made_by = made_from = None
    if made_by != "demo" and made_from != str(gallery_csv.resolve()):
        raise UserError(f"{run} holds a trained run that the demo did not make (its catalog: {made_from}): "
                        f"give the demo another --out")


def main(cfg: DemoConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> str:
    """The demo command: split, train-siamese, train-verifier, calibrate, match, evaluate."""
    out, catalog, images, seed = paths.out, paths.catalog, paths.images, cfg.seed
    t0 = time.perf_counter()
    out = Path(out)
    check_replaceable(out / "run", out / "split" / "gallery.csv")
    made_out, made_split = not out.exists(), not (out / "split").exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if catalog is None:
            if images is not None:
                raise UserError("--images goes with --catalog (the built-in sample needs neither)")
            catalog = make_dataset(out / "sample", seed=seed, **SAMPLE)
            n_unseen, source = SAMPLE_UNSEEN, "the built-in synthetic sample"
        else:
            full = load_catalog(catalog, images)  # validates before any work
            n_unseen, source = unseen_of(len(full.individuals())), f"{catalog}"
        # everything it writes goes under --out: the catalog's folder may be read-only or someone's files
        gallery_csv, queries_dir, truth_csv = split_open_set(Path(catalog), out / "split", n_unseen=n_unseen,
                                                             seed=seed, images_dir=images)
        run = out / "run"
        preset = train_siamese.PRESETS["demo"]
        tcfg = replace(preset, seed=seed, threads=threads, precision=precision)
        if paths.catalog is not None:  # your own catalog: enough held-out individuals for calibrate's folds
            tcfg = replace(tcfg, heldout_fraction=heldout_fraction(gallery_csv, tcfg.heldout_fraction,
                                                                   n_unseen, paths.catalog))
    except UserError:  # refused (a catalog too small to split and train on): nothing of its own left behind
        if made_split:
            shutil.rmtree(out / "split", ignore_errors=True)
        if made_out and not any(out.iterdir()):
            out.rmdir()
        raise
    log.info("1/5 train-siamese (%d epochs at most, %.0f min budget)", tcfg.epochs, tcfg.max_minutes)
    summary = train_siamese.main(tcfg, train_siamese.Paths(gallery_csv, run), progress=progress, overwrite=True,
                                 refit="the demo fits it again")
    RunFolder(run).update_config(made_by="demo")  # (check_replaceable)
    log.info("2/5 train-verifier")
    verifier = train_verifier.main(VerifierTrainConfig(seed=seed), train_verifier.Paths(run), threads, progress,
                                   precision)
    log.info("3/5 calibrate")
    calibration = calibrate.main(calibrate.CalibrateConfig(seed=seed), calibrate.Paths(run), threads=threads,
                                 progress=progress, precision=precision, remedy=DEMO_REMEDY)
    log.info("4/5 match the held-out photos")
    engine = Engine.load(run, precision)
    queries = load_catalog(truth_csv, queries_dir, allow_new=True)  # truth.csv lists the query photos with their answer
    mcfg = MatchConfig()
    pairs, emb = match_pairs(engine, queries.records, mcfg, progress)
    tau = engine.tau(mcfg)
    results = engine.rank(pairs, tau)
    predictions = out / "predictions.csv"
    write_predictions(results, predictions, {"run": str(run), "tau": tau})
    truth = {r.image: r.individual_id for r in queries.records}
    report = write_review(engine, results, out / "report.html", tau, truth)
    log.info("5/5 evaluate")
    table = evaluate_pairs(engine, pairs, truth, mcfg)
    # saved as `evaluate` saves its figures (the command it prints below replaces them)
    save_evaluation(engine, mcfg, truth_csv, tau, evaluate_results(results, truth), table)
    n_new = sum(1 for t in truth.values() if t == NEW_INDIVIDUAL)
    return "\n".join([
        f"demo on {source}: gallery {summary['gallery_photos']} photos of "
        f"{summary['gallery_individuals']} individuals, {len(truth)} query photos ({n_new} of unseen individuals)",
        f"siamese: {summary['epochs_trained']} epoch(s); verifier held-out AUC {verifier['matchers']['sift']['heldout_auc_validator']:.3f}"
        f" (inlier count {verifier['matchers']['sift']['heldout_auc_inlier_count']:.3f}); calibrated tau {tau:.3f} on "
        f"{calibration['queries']} held-out queries",
        format_metrics(table),
        "the engine answers with: fused",
        f"outputs: run folder {run}, predictions {predictions} (+ .json), review page {report}, truth {truth_csv}",
        "score them again (e.g. with other options): python cli.py evaluate --catalog "
        f"{shlex.quote(str(truth_csv))} --images {shlex.quote(str(queries_dir))} --run {shlex.quote(str(run))}",
        f"demo finished in {time.perf_counter() - t0:.0f} s",
    ])
