"""Time one LAP hard-negative mining step at several training-set sizes.

    python bench/lap_mining.py [--sizes 1000,5000,20000,50000] [--quick]

Two kinds of scores: "random" (uniform scores, random top-k lists) and "realistic" (synthetic
embeddings: ~N/8 individuals, each a cluster around its own centre in 256-d, cosine similarities;
top-k lists from a faiss IndexFlatIP search, timed separately). Methods: "dense" is
``mine_negatives`` on the full matrix (exact lapjv up to ``block_size``, the top-k graph past it);
"topk" is ``mine_negatives_topk`` with the default config (blocks past ``sparse_block_size``);
"topk-one-graph" solves the whole graph in one lapmod call, to show what the blocks save and cost.
``neg_score`` is the mean score of the chosen negatives (higher = harder). Prints a table, the share
of an epoch spent mining at the development set's size, and writes bench/results/lap_mining.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe, headline  # noqa: E402
from siamese.lap_miner import LapMiner, MinerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lap_mining.json"
DIM = 256


def synthetic_embeddings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_individuals = max(n // 8, 2)
    centres = rng.normal(size=(n_individuals, DIM))
    labels = rng.integers(0, n_individuals, n)
    emb = centres[labels] + rng.normal(size=(n, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def timed(fn, repeats: int):
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def mine_dense(scores, labels, config, noise, seed):
    miner = LapMiner(config)
    pairs = miner.mine_negatives(scores, labels, noise, rng=seed)
    return pairs, miner.last_info


def mine_topk(neighbors, neighbor_scores, labels, config, noise, seed, random_pairs=None):
    miner = LapMiner(config)
    extra = {} if random_pairs is None else dict(
        random_neighbors=random_pairs[0], random_scores=random_pairs[1]
    )
    pairs = miner.mine_negatives_topk(neighbors, neighbor_scores, labels, noise, rng=seed, **extra)
    return pairs, miner.last_info


def run_size(n: int, args, config: MinerConfig, rng: np.random.Generator) -> list[dict]:
    rows = []
    repeats = 3 if n <= 5000 else 1
    noise = args.noise

    def record(kind, method, seconds, info=None, neg_score=None):
        row = dict(
            n=n, kind=kind, method=method, seconds=seconds, seconds_per_1k=seconds / n * 1000,
            solver=info.method if info else "", blocks=info.n_blocks if info else 0,
            pairs=info.n_pairs if info else 0, neg_score=neg_score,
        )
        rows.append(row)
        print_row(row)

    # (a) random scores
    labels = rng.integers(0, max(n // 8, 2), n)
    if n <= args.dense_max:
        scores = rng.random((n, n), dtype=np.float32)
        seconds, ((a, b), info) = timed(
            lambda: mine_dense(scores, labels, config, noise, 0), repeats
        )
        record("random", "dense", seconds, info, float(scores[a, b].mean()))
        del scores
    neighbors = rng.integers(0, n, (n, args.k))
    neighbor_scores = rng.random((n, args.k), dtype=np.float32)
    seconds, ((a, b), info) = timed(
        lambda: mine_topk(neighbors, neighbor_scores, labels, config, noise, 0), repeats
    )
    record("random", "topk", seconds, info)

    # (b) realistic scores
    import faiss

    emb, labels = synthetic_embeddings(n, rng)
    if n <= args.dense_max:
        start = time.perf_counter()
        scores = emb @ emb.T
        record("realistic", "score-matrix", time.perf_counter() - start)
        seconds, ((a, b), info) = timed(
            lambda: mine_dense(scores, labels, config, noise, 0), repeats
        )
        record("realistic", "dense", seconds, info, float(scores[a, b].mean()))
        del scores
    start = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(emb)
    neighbor_scores, neighbors = index.search(emb, args.k)
    record("realistic", f"faiss-top{args.k}-search", time.perf_counter() - start)
    random_neighbors = rng.integers(0, n, (n, 8))
    random_scores = np.einsum("id,ikd->ik", emb, emb[random_neighbors])

    def neg_score(a, b):
        return float(np.einsum("id,id->i", emb[a], emb[b]).mean())

    for method, cfg in [
        ("topk", config),
        ("topk-one-graph", replace(config, sparse_block_size=10**9)),
    ]:
        if method == "topk-one-graph" and n <= config.sparse_block_size:
            continue
        seconds, ((a, b), info) = timed(
            lambda cfg=cfg: mine_topk(
                neighbors, neighbor_scores, labels, cfg, noise, 0, (random_neighbors, random_scores)
            ),
            repeats,
        )
        record("realistic", method, seconds, info, neg_score(a, b))
    return rows


def print_header():
    print(f"{'N':>7} {'kind':<10} {'method':<20} {'seconds':>8} {'s/1k img':>9} "
          f"{'neg_score':>9}  solver")


def print_row(row):
    score = "" if row["neg_score"] is None else f"{row['neg_score']:.4f}"
    solver = f"{row['solver']} ({row['blocks']} blocks)" if row["solver"] else ""
    print(f"{row['n']:>7} {row['kind']:<10} {row['method']:<20} {row['seconds']:>8.3f} "
          f"{row['seconds_per_1k']:>9.4f} {score:>9}  {solver}", flush=True)


def epoch_share(args, config: MinerConfig, rng: np.random.Generator) -> dict:
    emb, labels = synthetic_embeddings(args.n_train, rng)
    scores = emb @ emb.T
    seconds, (_, info) = timed(lambda: mine_dense(scores, labels, config, args.noise, 0), 3)
    epoch_seconds = args.n_train * args.passes / args.train_ips
    per_epoch = seconds / args.refresh_every
    share = per_epoch / epoch_seconds
    result = dict(
        n_train=args.n_train, passes=args.passes, train_ips=args.train_ips,
        refresh_every=args.refresh_every, mining_seconds=seconds, solver=info.method,
        epoch_seconds=epoch_seconds, mining_share=share, target_share=0.15,
    )
    print(
        f"\nDevelopment set: {args.n_train} training images, "
        f"epoch = {args.n_train} x {args.passes:g} passes / {args.train_ips:g} img/s "
        f"= {epoch_seconds:.0f} s; mining ({info.method}) takes "
        f"{seconds:.3f} s every {args.refresh_every} epochs = {100 * share:.2f}% of epoch time "
        f"(target < 15%: {'met' if share < 0.15 else 'NOT met'}). The score matrix itself "
        "(one embedding pass over the training images) is not counted here."
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,20000,50000",
                        help="comma-separated numbers of training images")
    parser.add_argument("--quick", action="store_true", help="only 1000 and 5000 images")
    parser.add_argument("--k", type=int, default=32, help="neighbours per image in the top-k input")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="noise scale K of the timed step (late-training value)")
    parser.add_argument("--dense-max", type=int, default=20000,
                        help="largest N for which the dense matrix is built (N^2 x 4 bytes)")
    parser.add_argument("--n-train", type=int, default=1500,
                        help="training images of the development set")
    parser.add_argument("--train-ips", type=float, default=36.0,
                        help="training throughput in images per second "
                             "(mobilenetv2_100, 224 px, bf16)")
    parser.add_argument("--passes", type=float, default=4.0,
                        help="image passes per training image per epoch (a positive and a negative "
                             "pair per image, two images per pair)")
    parser.add_argument("--refresh-every", type=int, default=2, help="mine every this many epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [1000, 5000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]

    config = MinerConfig()
    rng = np.random.default_rng(args.seed)
    machine = describe()
    print(headline(machine))
    print(f"LAP mining benchmark, K = {args.noise}, config {config}, {os.cpu_count()} CPUs")
    print_header()
    rows = []
    start = time.perf_counter()
    for n in sizes:
        rows.extend(run_size(n, args, config, rng))
    share = epoch_share(args, config, rng)
    print(f"Total benchmark time {time.perf_counter() - start:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        config=asdict(config), noise_scale=args.noise, k=args.k, cpus=os.cpu_count(),
        machine={**machine, "platform": platform.platform()}, rows=rows, epoch_share=share,
    )
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
