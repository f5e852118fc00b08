#!/usr/bin/env python3
"""Local executor against a local Ray on the same machine: throughput of embedding and of keypoint
extraction + verification, Ray's start-up and per-task overhead, the crossover gallery size, and
the faiss index's memory per 100k photos.

Photos are the development set's (the folder `NYALA_DATA` names); nothing is cached (each side computes
everything). Verification pairs are consecutive photos (half of them the same individual).
Crossover: the number of gallery photos (embedding + keypoints) beyond which Ray's start-up is paid
back, if Ray's throughput beats the local one's; on a single machine it may never be.
Prints the machine, a table, and writes bench/results/ray_throughput.json.

  python bench/ray_throughput.py [--photos 256] [--pairs 256] [--cpus 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.accuracy import DATA  # noqa: E402
from bench.machine import describe, headline  # noqa: E402
from core.catalog import load_catalog  # noqa: E402
from core.executor import ExecutorConfig, LocalExecutor, make_executor  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from keypoints.features import PRESETS as KP_PRESETS  # noqa: E402
from keypoints.stage import REMOTE_CHUNK, verify_chunk  # noqa: E402
from keypoints.store import KeypointStore, verify_record_pairs  # noqa: E402
from keypoints.verify import VERIFY_PRESETS  # noqa: E402
from siamese.config import ModelConfig  # noqa: E402
from siamese.embed import embed_records  # noqa: E402
from siamese.model import SiameseNet  # noqa: E402


def noop(x):
    return x


def index_memory_per_100k(dim: int) -> dict:
    import faiss

    x = np.random.default_rng(0).standard_normal((100_000, dim)).astype(np.float32)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    nlist = int(4 * np.sqrt(len(x)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[:50_000])
    ivf.add(x)
    size = lambda index: len(faiss.serialize_index(index)) / 1e6  # noqa: E731
    return {"dim": dim, "flat_mb": round(size(flat), 1), "ivf_flat_mb": round(size(ivf), 1), "nlist": nlist}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = ap.parse_args()
    if not (DATA / "catalog.csv").is_file():
        sys.exit(f"development set not found at {DATA}: nothing to measure")
    set_threads(args.cpus)
    machine = describe()
    print(headline(machine), flush=True)
    records = load_catalog(DATA / "catalog.csv").records
    photos = records[:args.photos]
    pair_recs = [(records[i], records[i + 1]) for i in range(args.pairs)]
    model = SiameseNet(ModelConfig())
    kcfg, vcfg = KP_PRESETS["default"], VERIFY_PRESETS["default"]
    res: dict = {"photos": len(photos), "pairs": len(pair_recs), "ray_cpus": args.cpus}

    def run_embed(executor):
        t = time.perf_counter()
        out = embed_records(model, photos, None, 32, 2, progress=False, executor=executor)
        return len(out.ok) / (time.perf_counter() - t), out.embeddings

    def run_verify_local():
        with tempfile.TemporaryDirectory() as tmp:
            store = KeypointStore(Path(tmp), kcfg)
            t = time.perf_counter()
            out = verify_record_pairs(store, pair_recs, vcfg, workers=args.cpus, progress=False)
            return len(pair_recs) / (time.perf_counter() - t), out

    def run_verify_ray(executor):
        chunks = [pair_recs[i:i + REMOTE_CHUNK] for i in range(0, len(pair_recs), REMOTE_CHUNK)]
        tasks = ({"pairs": c, "cached": {}, "skip": set()} for c in chunks)
        t = time.perf_counter()
        out = [r for res_, _, _ in executor.map(verify_chunk, tasks, "KeypointStage", kcfg, vcfg) for r in res_]
        return len(pair_recs) / (time.perf_counter() - t), out

    local = LocalExecutor()
    res["local_embed_img_s"], emb_local = run_embed(local)
    res["local_verify_pairs_s"], ver_local = run_verify_local()
    t = time.perf_counter()
    ray_ex = make_executor(ExecutorConfig(kind="ray", num_cpus=args.cpus))
    res["ray_start_s"] = time.perf_counter() - t
    run_embed(ray_ex)  # warm-up: workers start, the network is shipped and built
    res["ray_embed_img_s"], emb_ray = run_embed(ray_ex)
    res["ray_verify_pairs_s"], ver_ray = run_verify_ray(ray_ex)
    res["same_embeddings"] = bool(np.array_equal(emb_local, emb_ray))
    res["same_inliers"] = [a.n_inliers for a in ver_local] == [b.n_inliers for b in ver_ray]
    n = 200
    t = time.perf_counter()
    list(ray_ex.map(noop, range(n)))
    res["ray_task_overhead_ms"] = (time.perf_counter() - t) / n * 1000
    # a gallery photo costs one embedding and one keypoint extraction; a pair's cost includes the
    # extraction of its photos, so per photo ~ 1/embed + 1/verify rate (upper bound)
    per_local = 1 / res["local_embed_img_s"] + 1 / res["local_verify_pairs_s"]
    per_ray = 1 / res["ray_embed_img_s"] + 1 / res["ray_verify_pairs_s"]
    res["crossover_photos"] = (round(res["ray_start_s"] / (per_local - per_ray)) if per_ray < per_local else None)
    res["index_per_100k"] = index_memory_per_100k(model.dim)
    rows = [("embedding (img/s)", res["local_embed_img_s"], res["ray_embed_img_s"]),
            ("keypoints + verification (pairs/s)", res["local_verify_pairs_s"], res["ray_verify_pairs_s"])]
    print("| work | local | Ray (local, %d CPUs) |" % args.cpus)
    print("|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} |")
    print(f"Ray start {res['ray_start_s']:.1f} s, {res['ray_task_overhead_ms']:.1f} ms per task; identical "
          f"embeddings: {res['same_embeddings']}, identical inlier counts: {res['same_inliers']}; crossover: "
          + (f"{res['crossover_photos']} photos" if res["crossover_photos"] else "none on this machine (Ray is not "
             "faster on the same cores)"))
    m = res["index_per_100k"]
    print(f"faiss index per 100k photos ({m['dim']}-d float32): flat {m['flat_mb']} MB, IVF-Flat {m['ivf_flat_mb']} MB")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_throughput.json").write_text(json.dumps({"machine": machine, **{
        k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}}, indent=1))
    print(f"wrote {out / 'ray_throughput.json'}")


if __name__ == "__main__":
    main()
