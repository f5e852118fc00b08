#!/usr/bin/env python3
"""Training recipes for the Siamese network, side by side on the development set (the folder `NYALA_DATA` names).

Each recipe trains `train-siamese` for the same time budget on the protocol's gallery (seeded split),
then the protocol's known queries are ranked by the embedding cosine and by the pair head over the
faiss shortlist (no keypoint stage: this compares what training changes). Recipes:
  current      the default TrainConfig
  mined025     mined_weight 0.25 (the LAP-mined negatives carry a quarter of the negatives' loss)
  mined05      mined_weight 0.5
  batchlap     in-batch LAP on the batch's own cosine matrix, mined_weight 0.25
  arcface      sub-center ArcFace (weight 1) beside the pair BCE
  wide         input 256x352 (flanks are wide)
  wide_batchlap  both
Prints a table (closed-set top-1 and MAP@5 of each stage, the epochs reached) and writes
bench/results/embedding_recipe.json.

  python bench/embedding_recipe.py [--minutes 6] [--seeds 0,1] [--recipes current,arcface]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy import DATA, make_split, read_truth  # noqa: E402
from bench.machine import describe, headline  # noqa: E402
from core.catalog import load_catalog  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from engine import train_siamese  # noqa: E402
from engine.matching import evaluate_pairs  # noqa: E402
from engine.pipeline import Engine, MatchConfig  # noqa: E402
from siamese.config import ModelConfig, TrainConfig  # noqa: E402

RECIPES = {
    "current": {},
    "mined025": {"mined_weight": 0.25},
    "mined05": {"mined_weight": 0.5},
    "batchlap": {"mining": "batch", "mined_weight": 0.25},
    "arcface": {"arcface_weight": 1.0},
    "wide": {"model": ModelConfig(input_size=(256, 352))},
    "wide_batchlap": {"model": ModelConfig(input_size=(256, 352)), "mining": "batch", "mined_weight": 0.25},
}


def closed_set(rows: dict) -> dict:
    return {name: {k: None if m[k] is None else round(m[k], 3) for k in ("closed_top1", "closed_map5")}
            for name, m in rows.items() if "closed_top1" in m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-recipe"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget of each recipe")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train exactly this many epochs instead of a time budget (fair on a busy machine)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not (DATA / "catalog.csv").is_file():
        sys.exit(f"development set not found at {DATA}: nothing to measure")
    unknown = set(args.recipes.split(",")) - set(RECIPES)
    if unknown:
        sys.exit(f"unknown recipe(s) {sorted(unknown)}; known: {', '.join(RECIPES)}")
    set_threads(args.threads)
    machine = describe()
    print(headline(machine), flush=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = args.work / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        gallery, qdir, qcsv, truth_csv = make_split(work, seed)
        truth = read_truth(truth_csv)
        records = load_catalog(qcsv, qdir, require_labels=False).records
        for name in args.recipes.split(","):
            budget = ({"epochs": args.epochs, "max_minutes": None} if args.epochs
                      else {"max_minutes": args.minutes})
            cfg = dataclasses.replace(TrainConfig(seed=seed, threads=args.threads, **budget), **RECIPES[name])
            run = work / f"run_{name}"
            t0 = time.perf_counter()
            summary = train_siamese.main(cfg, train_siamese.Paths(gallery, run, DATA), progress=False, overwrite=True)
            engine = Engine.load(run)
            mc = MatchConfig()
            emb = engine.embed(records, mc, progress=False)
            pairs = engine.pair_scores(records, emb, mc)
            rows = closed_set(evaluate_pairs(engine, pairs, truth, mc))
            line = {"seed": seed, "recipe": name, "epochs": summary["epochs_trained"],
                    "train_seconds": summary.get("train_seconds"), "best_val": round(summary.get("best_val", float("nan")), 3),
                    "seconds": round(time.perf_counter() - t0), **{
                        f"{stage}:{k}": v for stage, m in rows.items() for k, v in m.items()}}
            results.append(line)
            print(json.dumps(line), flush=True)
    keys = [k for k in results[0] if ":" in k]
    print("\n" + " | ".join(["seed", "recipe", "epochs", "val"] + keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in ["seed", "recipe", "epochs", "best_val"] + keys))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding_recipe.json").write_text(json.dumps({"machine": machine, "args": {
        k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"wrote {out / 'embedding_recipe.json'}")


if __name__ == "__main__":
    main()
