#!/usr/bin/env python3
"""Seconds per query of `match` with features cached, per stage, for several --votes / --verify-top
(/ --shortlist) settings on one trained and verified run.

The run and the queries are those of `bench/accuracy.py` (its --work folder: `run_trained/` and
`split/queries`), whose evaluation has cached every photo's embedding and keypoints and built the
keypoint-vote index. Each setting gets a fresh copy of the run whose cache shares the features,
embeddings and vote index (links) but starts with no verified pairs, so that every verification
is done again, as for a new query. Per setting: seconds per query of each stage (engine.seconds:
shortlist, votes, pair head, keypoint verification...), the total, and the verifications per
query. Nothing else should run on the machine meanwhile.
Prints the machine, a table, and writes bench/results/match_speed.json.

  python bench/match_speed.py [--work /tmp/bench-accuracy] [--settings 0:20,20:50,100:300:200] [--queries 100]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.machine import describe, headline  # noqa: E402
from core.catalog import load_catalog  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from bench.accuracy import vote_setting  # noqa: E402
from engine.pipeline import Engine, MatchConfig  # noqa: E402

PAIR_CACHES = ("pairs", "pairs-xfeat")  # verified pairs: not shared, so that each setting verifies anew


def fresh_copy(run: Path, dst: Path) -> None:
    """`run`'s files, and a cache linking to its caches except the verified pairs."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in run.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    (dst / "cache").mkdir()
    for sub in (run / "cache").iterdir():
        if sub.name not in PAIR_CACHES:
            (dst / "cache" / sub.name).symlink_to(sub.resolve(), target_is_directory=sub.is_dir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-accuracy"),
                    help="bench/accuracy.py's --work folder (run_trained/, split/)")
    ap.add_argument("--run", default="run_trained", help="the run folder's name in --work")
    ap.add_argument("--settings", default="0:20,20:20,0:50,20:50",
                    help=f"VOTES:V[:K] settings to time (K: --shortlist, default {MatchConfig.shortlist})")
    ap.add_argument("--queries", type=int, default=100, help="the first N query photos of the split")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # each setting differs from the run's calibration: its threshold does not matter for the time
    logging.getLogger("engine.pipeline").setLevel(logging.ERROR)
    run, split = args.work / args.run, args.work / "split"
    if not (run / "verifier.json").is_file() or not (split / "queries_viewpoint.csv").is_file():
        sys.exit(f"{args.work}: no verified run {args.run}/ or split/ (run bench/accuracy.py --work {args.work} "
                 "first)")
    try:
        entries = args.settings.split(",")
        if any(e.count(":") not in (1, 2) for e in entries):
            raise ValueError
        settings = [vote_setting(e) for e in entries]
        if any(cfg.verify_top < 1 or cfg.shortlist < 1 for cfg in settings):
            raise ValueError
    except ValueError:
        sys.exit(f"--settings {args.settings}: expected VOTES:V or VOTES:V:K (V, K >= 1) separated by commas")
    set_threads()
    machine = describe()
    print(headline(machine), flush=True)
    records = load_catalog(split / "queries_viewpoint.csv", split / "queries", require_labels=False).records
    records = records[: args.queries]
    rows = []
    for cfg in settings:
        copy = args.work / f"speed_{args.run}"
        fresh_copy(run, copy)
        engine = Engine.load(copy)
        if cfg.votes:
            engine.vote_index()  # loaded (or built) before the clock starts
        engine.seconds.clear()
        t0 = time.perf_counter()
        emb = engine.embed(records, cfg, progress=False)
        pairs = engine.pair_scores(records, emb, cfg)
        engine.rank(pairs, engine.tau(cfg))
        total = (time.perf_counter() - t0) / len(records)
        verified = np.mean([np.isfinite(qp.stages["keypoints"]).sum() for qp in pairs])
        stages = {k: s / len(records) for k, s in engine.seconds.items() if s > 0}
        rows.append({"votes": cfg.votes, "verify_top": cfg.verify_top, "shortlist": cfg.shortlist,
                     "seconds_per_query": total, "verified_per_query": verified,
                     "stage_seconds_per_query": stages, "embeddings_cached": not emb.computed})
        print(f"votes {cfg.votes:3d}  V {cfg.verify_top:3d}  K {cfg.shortlist:3d}: {total:.3f} s/query, "
              f"{verified:.1f} verifications; " +
              ", ".join(f"{k} {s:.3f} ({s / total:.0%})" for k, s in stages.items()), flush=True)
        shutil.rmtree(copy)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "match_speed.json").write_text(json.dumps({"machine": machine, "queries": len(records), "rows": rows,
                                                      "args": {k: str(a) for k, a in vars(args).items()}}, indent=1))
    print(f"wrote {out / 'match_speed.json'}")


if __name__ == "__main__":
    main()
