"""demo: the whole path on a sample that needs nothing outside the repo (or on the user's photos)."""
from __future__ import annotations

import time
from pathlib import Path

from engine.catalog import load_catalog
from engine.errors import UserError
from engine.matching import evaluate_results, format_metrics, match_records
from engine.metrics import NEW_INDIVIDUAL
from engine.pipeline import Engine, MatchConfig, write_predictions
from engine.runfolder import read_json
from engine.synthetic import make_dataset, split_open_set
from siamese.model import ModelConfig
from siamese.train import PRESETS, train_siamese

# The built-in sample: small enough to run end to end in under two minutes on 2 CPU cores.
SAMPLE = dict(n_individuals=24, photos_per_individual=6, size=(192, 256))
SAMPLE_UNSEEN = 4


def _read_truth(path: Path) -> dict[str, str]:
    import csv

    with open(path, newline="") as f:
        return {r["image"]: r["individual_id"] for r in csv.DictReader(f)}


def run_demo(out: Path, catalog: Path | None = None, images: Path | None = None, seed: int = 0,
             threads: int | None = None, progress: bool = True) -> str:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if catalog is None:
        if images is not None:
            raise UserError("--images goes with --catalog (the built-in sample needs neither)")
        catalog = make_dataset(out / "sample", seed=seed, **SAMPLE)
        n_unseen, source = SAMPLE_UNSEEN, "built-in synthetic sample"
    else:
        full = load_catalog(catalog, images)  # validates before any work
        n_unseen, source = max(1, len(full.individuals()) // 5), f"{catalog}"
        if images is not None and Path(images).resolve() != Path(catalog).resolve().parent:
            raise UserError("demo on your own photos needs the catalog's image paths relative to the "
                            "catalog's folder (put the CSV in the images folder)")
    gallery_csv, queries_dir, truth_csv = split_open_set(Path(catalog), out / "split", n_unseen=n_unseen, seed=seed)
    run = out / "run"
    preset = PRESETS["demo"]
    from dataclasses import replace

    cfg = replace(preset, seed=seed, threads=threads, model=ModelConfig(input_size=preset.model.input_size))
    summary = train_siamese(gallery_csv, run, cfg, progress=progress)
    engine = Engine.load(run)
    queries = load_catalog(truth_csv, queries_dir)  # truth.csv lists the query photos with their answer
    results, emb = match_records(engine, queries.records, MatchConfig(), progress)
    predictions = out / "predictions.csv"
    write_predictions(results, predictions, {"run": str(run)})
    truth = _read_truth(truth_csv)
    metrics = evaluate_results(results, truth)
    n_new = sum(1 for t in truth.values() if t == NEW_INDIVIDUAL)
    return "\n".join([
        f"demo on the {source}: gallery {summary['gallery_photos']} photos of "
        f"{summary['gallery_individuals']} individuals, {len(truth)} query photos ({n_new} of unseen individuals)",
        format_metrics({"engine": metrics}),
        f"outputs: run folder {run}, predictions {predictions} (+ .json), truth {truth_csv}",
        f"demo finished in {time.perf_counter() - t0:.0f} s",
    ])
