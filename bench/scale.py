#!/usr/bin/env python3
"""Speed and memory of matching at gallery sizes of 1k, 10k and 100k photos, features cached.

The galleries are the real development photos (the folder `NYALA_DATA` names) plus **feature-level
replicas**: each replica is a real gallery photo's embedding with noise added (cosine ~0.7 to its
source, renormalised) under a new individual ID, and that photo's real keypoints (HDF5 hard links
in the run's keypoint cache, so 100k entries cost no 40 GB of disk). What a query costs depends on
the gallery only through the faiss index (size, dimension, cluster structure: replicas cluster
around real photos as photos of one animal do), the cache lookups among N entries, and the V (50)
keypoint sets it is verified against (real ones, of real sizes); none of it depends on the pixels
of the gallery, which is why replicas measure it faithfully. What they do not reproduce: reading
100k distinct keypoint sets from disk (the hard links share data, so the OS cache is warmer than
it would be for a real catalogue of that size).

For each size: index build time and type; seconds per query of each stage (embedding read from
the cache, shortlist search, pair head, keypoint verification, ranking) over --queries held-out
real photos; recall@K of the IVF index against exact search (where IVF is used, and always at
the largest size); `enroll` of 1000 new real photos (embedding + keypoints computed, as a user's
new photos would be). Then the peak memory of `cli.py match` (a subprocess) for Q and 4Q queries
on the 10k gallery: it must not grow with the number of queries.
Prints the machine, a table, and writes bench/results/scale.json.

  python bench/scale.py [--sizes 1000,10000,100000] [--queries 200] [--work /tmp/bench-scale] [--votes 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.machine import describe, headline  # noqa: E402
from core.cache import FeatureCache, _group_name  # noqa: E402
from core.catalog import load_catalog  # noqa: E402
from core.gallery import Gallery  # noqa: E402
from core.runfolder import RunFolder  # noqa: E402
from engine import enroll, train_siamese  # noqa: E402
from engine.pipeline import Engine, MatchConfig, scoring_paths  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from siamese.embed import model_fingerprint  # noqa: E402
from siamese.index import EXACT_MAX, NPROBE, EmbeddingIndex, build_index  # noqa: E402
from engine.config import VerifierTrainConfig  # noqa: E402
from siamese.config import TrainConfig  # noqa: E402

DATA = Path(os.environ.get("NYALA_DATA") or ROOT.parent / "shared" / "data" / "nyala")  # the development set
N_ENROLL = 1000
REPLICA_NOISE = 1.0  # |noise| relative to the unit embedding: cosine to the source 1/sqrt(2) ~ 0.7
log = logging.getLogger("bench.scale")


def write_csv(path: Path, rows: list[dict], columns=("image", "individual_id")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def split_photos(work: Path, n_queries: int, seed: int):
    """Real photos: gallery (the rest), queries (held out), enroll (1000 new photos)."""
    with open(DATA / "catalog.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    queries, enroll, gallery = rows[:n_queries], rows[n_queries:n_queries + N_ENROLL], rows[n_queries + N_ENROLL:]
    return (write_csv(work / "gallery.csv", gallery), write_csv(work / "queries.csv", queries, ("image",)),
            write_csv(work / "enroll.csv", enroll))


def build_base(work: Path, gallery_csv: Path, queries_csv: Path) -> Path:
    """The real-photo run: pretrained network, verifier, calibration; query features cached."""
    from engine import calibrate, train_verifier

    base = work / "base"
    if not (base / "calibration.json").is_file():
        train_siamese.main(TrainConfig(epochs=0), train_siamese.Paths(gallery_csv, base, DATA), progress=False,
                           overwrite=True)
        train_verifier.main(VerifierTrainConfig(), train_verifier.Paths(base), progress=False)
        calibrate.main(calibrate.CalibrateConfig(), calibrate.Paths(base), progress=False)
    engine = Engine.load(base)
    queries = load_catalog(queries_csv, DATA, require_labels=False).records
    engine.embed(queries, MatchConfig(), progress=False)
    engine.stage("keypoints").store.get(queries + engine.gallery.records(), progress=False)
    return base


def copy_entries(src: FeatureCache, dst: FeatureCache, keys: list[str]) -> None:
    dst.add(src.get(keys))


def build_scaled(base: Path, n: int, work: Path, seed: int) -> Path:
    """A run folder whose gallery is the base gallery plus replicas up to n photos."""
    run = work / f"run_{n}"
    if (run / "gallery.h5").is_file() and len(Gallery.load(run / "gallery.h5")) == n:
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    # the settings, the calibration and its individuals, and every file the scores depend on, where the base has it
    for path in [base / name for name in ("config.json", "calibration.json", "heldout.json")] + \
            scoring_paths(RunFolder(base)):
        if path.is_file():
            shutil.copy2(path, run / path.name)
    g = Gallery.load(base / "gallery.h5")
    real = len(g)
    rng = np.random.default_rng(seed)
    src = np.arange(n) % real if n <= real else np.concatenate([np.arange(real), rng.integers(0, real, n - real)])
    src = src[:n]
    emb = g.embeddings[src].copy()
    rep = np.arange(n) >= real
    noise = rng.standard_normal((int(rep.sum()), emb.shape[1])).astype(np.float32)
    emb[rep] += REPLICA_NOISE * noise / np.sqrt(emb.shape[1])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [g.keys[s] if not r else f"replica:{k}:{g.keys[s]}" for k, (s, r) in enumerate(zip(src, rep))]
    scaled = Gallery(paths=[g.paths[s] if not r else f"/replica/{k}.jpg" for k, (s, r) in enumerate(zip(src, rep))],
                     ids=[g.ids[s] if not r else f"replica-{k // 8}" for k, (s, r) in enumerate(zip(src, rep))],
                     viewpoints=[""] * n, bboxes=g.bboxes[src], embeddings=emb, keys=keys)
    scaled.save(run / "gallery.h5")
    # caches: the queries' embeddings and keypoints; the gallery's keypoints, replicas as hard links
    engine = Engine.load(base)
    emb_fp = model_fingerprint(engine.model)
    kp_src = engine.stage("keypoints").store.cache
    # (cache/keypoints-whitened where the base run whitens its descriptors: the store the stage reads)
    kp_dst = FeatureCache(run / Path(kp_src.folder).relative_to(base), kp_src.fingerprint)
    base_kp = kp_src.get(sorted(set(g.keys)))

    def fill(f):
        for k, key in enumerate(keys):
            source = key if not rep[k] else g.keys[src[k]]
            arrays = base_kp.get(source)
            if arrays is None:
                continue
            name = _group_name(key)
            grp = f.create_group(name)
            grp.attrs["key"] = key
            first = _group_name(source)
            if rep[k] and first in f:
                for a in f[first]:
                    grp[a] = f[first][a]  # a hard link: same data, no copy
            else:
                for a, arr in arrays.items():
                    grp.create_dataset(a, data=arr)

    kp_dst.folder.mkdir(parents=True, exist_ok=True)
    kp_dst.write_shard(fill)  # real photos come first in `keys`: a replica's source is there to link to
    queries_keys = [k for k in FeatureCache(base / "cache" / "embeddings", emb_fp).keys()]
    copy_entries(FeatureCache(base / "cache" / "embeddings", emb_fp),
                 FeatureCache(run / "cache" / "embeddings", emb_fp), queries_keys)
    q_kp = [k for k in kp_src.keys() if k not in set(g.keys)]
    copy_entries(kp_src, kp_dst, q_kp)
    return run


def stage_seconds(run: Path, queries_csv: Path, votes: int = 0) -> tuple[dict, Engine, np.ndarray]:
    """Seconds per query of each stage of `match`, features cached; and the shortlists found."""
    engine = Engine.load(run)
    records = load_catalog(queries_csv, DATA, require_labels=False).records
    cfg = MatchConfig(votes=votes)
    t = {}
    t0 = time.perf_counter()
    emb = engine.embed(records, cfg, progress=False)
    t["embed (cached)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = EmbeddingIndex(engine.search_embeddings)
    index.search(engine.searchable(emb.embeddings[:1]), 1)  # built on first use
    t["index build"] = time.perf_counter() - t0
    engine.index = index
    pairs = engine.pair_scores(records, emb, cfg)
    t.update({("shortlist search" if k == "shortlist" else k): v for k, v in engine.seconds.items()})
    t0 = time.perf_counter()
    engine.rank(pairs, engine.tau(cfg))
    t["ranking"] = time.perf_counter() - t0
    q = len(emb.ok)
    per_query = {k: v / q for k, v in t.items() if k != "index build"}
    per_query["total"] = sum(per_query.values())
    return {"index_build_s": t["index build"], "index": "exact" if index.exact else "IVF",
            "seconds_per_query": per_query, "queries": q}, engine, engine.searchable(emb.embeddings)


def recall_at_k(gallery_emb: np.ndarray, queries: np.ndarray, k: int = 50, nprobes=(32, 64, NPROBE)) -> dict:
    """IVF against exact search on the same gallery, for a few nprobe values."""
    q = np.ascontiguousarray(queries)
    exact = build_index(gallery_emb, exact_max=len(gallery_emb))
    t0 = time.perf_counter()
    _, e = exact.search(q, k)
    out = {"exact_search_s_per_query": (time.perf_counter() - t0) / len(q)}
    t0 = time.perf_counter()
    ivf = build_index(gallery_emb, exact_max=0)
    out["ivf_build_s"] = round(time.perf_counter() - t0, 2)
    out["nlist"] = int(ivf.nlist)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        t0 = time.perf_counter()
        _, i = ivf.search(q, k)
        out[f"nprobe_{nprobe}"] = {
            f"recall@{k}": round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(e, i)])), 4),
            "top1_agreement": round(float(np.mean(e[:, 0] == i[:, 0])), 4),
            "search_s_per_query": (time.perf_counter() - t0) / len(q)}
    return out


def enroll_seconds(run: Path, enroll_csv: Path) -> float:
    """`enroll` of new photos into a copy of the run (so later measurements see the same gallery)."""
    copy = run.with_name(run.name + "_enroll")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    t0 = time.perf_counter()
    enroll.main(MatchConfig(), enroll.Paths(enroll_csv, copy, DATA), progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(copy, ignore_errors=True)
    return seconds


def match_peak_memory(run: Path, queries_csv: Path, n: int, work: Path, votes: int = 0) -> dict:
    """Peak RSS of `cli.py match` over the first n queries (a folder of links to them)."""
    folder = work / f"queries_{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with open(queries_csv, newline="") as f:
        for k, r in enumerate(list(csv.DictReader(f))[:n]):
            (folder / f"{k:05d}{Path(r['image']).suffix}").symlink_to((DATA / r["image"]).resolve())
    cmd = [sys.executable, str(ROOT / "cli.py"), "match", str(folder), "--run", str(run),
           "--out", str(work / f"pred_{n}.csv"), "--votes", str(votes), "-q"]
    t0 = time.perf_counter()
    # a fresh process per measurement: RUSAGE_CHILDREN's maximum is over all children so far
    probe = (f"import resource, subprocess, sys; subprocess.run({cmd!r}, check=True, "
             f"stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return {"queries": n, "peak_rss_mb": round(int(out.stdout.strip()) / 1024, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-enroll", action="store_true")
    ap.add_argument("--votes", type=int, default=0,
                    help="match --votes (default 0: the embedding's shortlist; the vote index is built per gallery "
                    "and holds ~0.5 MB per photo, see README)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not (DATA / "catalog.csv").is_file():
        sys.exit(f"development set not found at {DATA}: nothing to measure")
    threads = set_threads()
    info = describe()
    print(headline(info), flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    gallery_csv, queries_csv, enroll_csv = split_photos(args.work, args.queries, args.seed)
    t0 = time.perf_counter()
    base = build_base(args.work, gallery_csv, queries_csv)
    print(f"base run (real photos, features cached) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for n in sizes:
        t0 = time.perf_counter()
        run = build_scaled(base, n, args.work, args.seed)
        built = time.perf_counter() - t0
        row, engine, q_emb = stage_seconds(run, queries_csv, args.votes)
        row["gallery_build_s"] = round(built, 1)
        if row["index"] != "exact" or n == max(sizes):
            row["ivf_vs_exact"] = recall_at_k(engine.search_embeddings, q_emb)
        if not args.skip_enroll:
            row["enroll_1000_s"] = round(enroll_seconds(run, enroll_csv), 1)
        rows[n] = row
        sq = row["seconds_per_query"]
        print(f"gallery {n:>7,}: {row['index']} index built in {row['index_build_s']:.2f} s; "
              f"{sq['total']:.3f} s/query ("
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in sq.items() if k != "total") + ")"
              + (f"; enroll 1000 photos {row['enroll_1000_s']:.0f} s" if "enroll_1000_s" in row else ""), flush=True)
        if "ivf_vs_exact" in row:
            r = row["ivf_vs_exact"]
            print(f"    exact search {r['exact_search_s_per_query'] * 1000:.2f} ms/query; IVF ({r['nlist']} lists, "
                  f"built in {r['ivf_build_s']:.1f} s): " + "; ".join(
                      f"nprobe {key.split('_')[1]} recall@50 {v['recall@50']:.4f}, top-1 agreement "
                      f"{v['top1_agreement']:.3f}, {v['search_s_per_query'] * 1000:.2f} ms/query"
                      for key, v in r.items() if key.startswith("nprobe_")), flush=True)
    mem_n = 10_000 if 10_000 in sizes else sizes[0]
    memory = [match_peak_memory(args.work / f"run_{mem_n}", queries_csv, q, args.work, args.votes)
              for q in (max(1, args.queries // 4), args.queries)]
    print(f"peak memory of `match` on the {mem_n:,} gallery: "
          + ", ".join(f"{m['queries']} queries {m['peak_rss_mb']:.0f} MB ({m['wall_s']:.0f} s)" for m in memory))
    print(f"\n{'gallery':>9s} {'index':>6s} {'s/query':>8s} {'target':>7s}  {'enroll 1000':>11s}")
    for n, row in rows.items():
        target = 0.3 if n <= 10_000 else 0.5
        ok = "ok" if row["seconds_per_query"]["total"] <= target else "MISSED"
        print(f"{n:>9,} {row['index']:>6s} {row['seconds_per_query']['total']:8.3f} {target:7.1f} {ok}  "
              f"{row.get('enroll_1000_s', float('nan')):10.0f}s")
    out = ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "threads": threads, "exact_max": EXACT_MAX, "sizes": rows,
                               "match_memory": memory, "args": {k: str(v) for k, v in vars(args).items()},
                               "maxrss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                              indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
