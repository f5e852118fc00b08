"""Speed and first signal of the keypoint verifier.

    python bench/verifier_speed.py [--data DIR] [--queries 10] [--V 50] [--workers 2]
                                   [--pairs 200] [--compare-methods]

Keypoints are extracted once (cached in memory, as the engine caches them in HDF5); the timed part
is what a query costs at match time: matching + double homography + features + validator, for V
candidates on `workers` threads. Uses the real nyala photos when present, else the synthetic
generator. Also reports, on ~`pairs` real pairs (same individual, same side, other sighting vs
different individual, same side), the AUC of the raw inlier count and the held-out AUC of the
validator (folds by individual). `--compare-methods` measures USAC_MAGSAC against RANSAC.
Writes bench/results/verifier_speed.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import faiss  # noqa: E402

from bench.machine import describe, headline  # noqa: E402
from core.metrics import roc_auc  # noqa: E402
from engine.config import MatchConfig  # noqa: E402
from keypoints.features import PRESETS, extract_keypoints, set_cv2_threads  # noqa: E402
from keypoints.homography import apply_h  # noqa: E402
from keypoints.validator import Validator, ValidatorConfig, heldout_auc  # noqa: E402
from keypoints.verify import FEATURE_NAMES, VERIFY_PRESETS, VerifyConfig, feature_matrix, verify_pairs  # noqa: E402

NYALA = Path(os.environ.get("NYALA_DATA") or ROOT.parent / "shared" / "data" / "nyala")  # the development set


# --------------------------------------------------------------------------------------------
# data
def nyala_rows(root: Path) -> list[dict]:
    with open(root / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def nyala_pairs(rows: list[dict], n_pos: int, n_neg: int, seed: int) -> list[tuple[dict, dict, int]]:
    """Positives: same individual, same side, different sighting (at most one per individual and
    side). Negatives: different individuals, same side."""
    rng = random.Random(seed)
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["individual_id"], r["side"]), []).append(r)
    pos = []
    for key in sorted(by):
        lst = by[key]
        cands = [(a, b) for i, a in enumerate(lst) for b in lst[i + 1:] if a["sighting_id"] != b["sighting_id"]]
        if cands:
            pos.append(rng.choice(cands))
    rng.shuffle(pos)
    neg = []
    while len(neg) < n_neg:
        a, b = rng.choice(rows), rng.choice(rows)
        if a["individual_id"] != b["individual_id"] and a["side"] == b["side"]:
            neg.append((a, b))
    return [(a, b, 1) for a, b in pos[:n_pos]] + [(a, b, 0) for a, b in neg]


def load_rgb(path: Path) -> np.ndarray:
    from core.images import load_image

    return load_image(path)


# --------------------------------------------------------------------------------------------
# measurements
def extract_all(images: dict[str, np.ndarray], kcfg) -> tuple[dict, float]:
    set_cv2_threads(1)  # one core per image: the figure a worker pool multiplies
    out, t = {}, time.perf_counter()
    for k, im in images.items():
        out[k] = extract_keypoints(im, kcfg)
    return out, (time.perf_counter() - t) / max(1, len(images))


def time_queries(queries: list[tuple[str, list[str]]], kps: dict, vcfg: VerifyConfig, validator: Validator | None,
                 worker_counts: tuple[int, ...]) -> dict:
    """Seconds per query for each worker count. The counts alternate query by query, so a change
    in the load of a shared machine hits all of them alike.

    Wall time is what a user waits; CPU time (all threads of this process) is what the work costs,
    and stays meaningful when other processes share the cores: on an idle machine
    wall ~= cpu / workers."""
    wall = {w: [] for w in worker_counts}
    cpu = {w: [] for w in worker_counts}
    for q, cands in queries:
        for w in worker_counts:
            t, c = time.perf_counter(), time.process_time()
            res = verify_pairs([(q, c) for c in cands], kps, vcfg, workers=w)
            if validator is not None:
                validator.predict(feature_matrix(res))
            wall[w].append(time.perf_counter() - t)
            cpu[w].append(time.process_time() - c)
    n_pairs = sum(len(c) for _, c in queries)
    return {f"workers_{w}": {
        "queries": len(queries),
        "V": len(queries[0][1]) if queries else 0,
        "workers": w,
        "s_per_query_mean": float(np.mean(wall[w])),
        "s_per_query_max": float(np.max(wall[w])),
        "ms_per_pair": 1000 * float(np.sum(wall[w])) / max(1, n_pairs),
        "cpu_s_per_query_mean": float(np.mean(cpu[w])),
        "cpu_ms_per_pair": 1000 * float(np.sum(cpu[w])) / max(1, n_pairs),
    } for w in worker_counts}


def homography_timing(pairs, kps, vcfg: VerifyConfig) -> float:
    """ms per pair of the double homography alone (matching done beforehand), 1 thread."""
    from keypoints.homography import double_homography
    from keypoints.matching import match_descriptors
    from keypoints.verify import reference_points

    inputs = []
    for a, b, _ in pairs:
        ka, kb = kps[a["image"]], kps[b["image"]]
        m = match_descriptors(ka.desc, kb.desc, vcfg.ratio, vcfg.mutual)
        inputs.append((reference_points(ka, m.idx[:, 0]), reference_points(kb, m.idx[:, 1]), ka.image_size))
    cv2.setNumThreads(1)
    t = time.process_time()
    for src, dst, size in inputs:
        double_homography(src, dst, size, vcfg.homography)
    return 1000 * (time.process_time() - t) / max(1, len(inputs))


def synthetic_warps(n: int, kcfg, vcfg: VerifyConfig, seed: int = 0) -> dict:
    """Corner error of the recovered homography on synthetic photos warped by random known H."""
    from engine.synthetic import make_individual, render_photo

    rng = np.random.default_rng(seed)
    size = (192, 256)
    h, w = size
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)
    errs, inl, times = [], [], []
    for i in range(n):
        img = render_photo(make_individual(f"w{i}", 1000 + i), rng, "left", size)
        # random perspective: move each corner by up to 12% of the side
        jitter = rng.uniform(-0.12, 0.12, (4, 2)) * [w, h]
        H = cv2.getPerspectiveTransform(corners.astype(np.float32), (corners + jitter).astype(np.float32))
        warped = cv2.warpPerspective(img, H, (w, h), borderMode=cv2.BORDER_REFLECT)
        ka, kb = extract_keypoints(img, kcfg), extract_keypoints(warped, kcfg)
        t = time.perf_counter()
        r = verify_pairs([(0, 1)], {0: ka, 1: kb}, vcfg)[0]
        times.append(time.perf_counter() - t)
        err = np.abs(apply_h(r.H, corners) - apply_h(H, corners)).max() if r.H is not None else np.inf
        errs.append(float(err))
        inl.append(r.n_inliers)
    e = np.array(errs)
    return {"n": n, "corner_err_median_px": float(np.median(e)), "corner_err_max_px": float(e.max()),
            "failures": int(np.sum(~np.isfinite(e) | (e > 3))), "inliers_median": float(np.median(inl)),
            "ms_per_pair": 1000 * float(np.mean(times))}


def pair_signal(pairs, kps, vcfg: VerifyConfig, workers: int, seed: int, fit_validator: bool) -> dict:
    keys = [(a["image"], b["image"]) for a, b, _ in pairs]
    y = np.array([lab for *_, lab in pairs])
    res = verify_pairs(keys, kps, vcfg, workers=workers)
    X = feature_matrix(res)
    out = {
        "pairs": len(pairs), "pos": int(y.sum()), "neg": int((1 - y).sum()),
        "auc_n_inliers": roc_auc(y, X[:, FEATURE_NAMES.index("n_inliers")]),
        "auc_n_inliers_accepted": roc_auc(y, X[:, FEATURE_NAMES.index("n_inliers_accepted")]),
        "auc_n_matches": roc_auc(y, X[:, FEATURE_NAMES.index("n_matches")]),
        "pos_accepted_frac": float(np.mean([r.n_inliers > 0 for r, lab in zip(res, y) if lab])),
        "neg_accepted_frac": float(np.mean([r.n_inliers > 0 for r, lab in zip(res, y) if not lab])),
    }
    validator = None
    if fit_validator:
        groups = np.array([[a["individual_id"], b["individual_id"]] for a, b, _ in pairs])
        vcfg_x = ValidatorConfig(n_jobs=workers)
        h = heldout_auc(X, y, groups, seed=seed, n_folds=5, cfg=vcfg_x)
        out["auc_validator_heldout"] = h["auc_validator"]
        validator = Validator(vcfg_x, FEATURE_NAMES).fit(X, y, seed=seed)
    return out, validator


# --------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=NYALA)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--V", type=int, default=MatchConfig.verify_top, help="candidates per query (match's default)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=200, help="real pairs for the AUC (half positive)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-methods", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verifier_speed.json")
    args = ap.parse_args()

    kcfg, vcfg = PRESETS[args.preset], VERIFY_PRESETS.get(args.preset, VERIFY_PRESETS["default"])
    faiss.omp_set_num_threads(1)
    rng = random.Random(args.seed)
    machine = describe()
    print(headline(machine), flush=True)
    result = {"machine": {**machine, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "opencv": cv2.__version__, "faiss": faiss.__version__},
              "args": {k: str(v) for k, v in vars(args).items()},
              "keypoint_config": asdict(kcfg), "verify_config": vcfg.to_dict()}

    real = (args.data / "metadata.csv").is_file()
    if real:
        rows = nyala_rows(args.data)
        pairs = nyala_pairs(rows, args.pairs // 2, args.pairs - args.pairs // 2, args.seed)
        # speed set: each query meets V same-side photos, its own individual's among them
        qrows = rng.sample(rows, args.queries)
        queries = []
        for q in qrows:
            same_side = [r for r in rows if r["side"] == q["side"] and r["image"] != q["image"]]
            queries.append((q["image"], [r["image"] for r in rng.sample(same_side, args.V)]))
        need = {p for a, b, _ in pairs for p in (a["image"], b["image"])} | {q for q, _ in queries} | \
            {c for _, cs in queries for c in cs}
        images = {p: load_rgb(args.data / p) for p in sorted(need)}
        result["data"] = f"nyala ({len(images)} photos)"
    else:
        from engine.synthetic import make_individual, render_photo

        srng = np.random.default_rng(args.seed)
        inds = [make_individual(f"s{i}", i) for i in range(args.V + 1)]
        images = {f"{i}_{j}": render_photo(ind, srng, "left") for i, ind in enumerate(inds) for j in range(2)}
        keys = sorted(images)
        queries = [(f"{i % len(inds)}_0", [k for k in keys if k != f"{i % len(inds)}_0"][: args.V])
                   for i in range(args.queries)]
        pairs = []
        result["data"] = "synthetic (nyala photos not found)"

    kps, t_extract = extract_all(images, kcfg)
    n_kp = [len(k) for k in kps.values()]
    result["extraction"] = {"s_per_image": t_extract, "keypoints_median": float(np.median(n_kp)),
                            "images": len(images), "threads": 1}

    validator = None
    if pairs:
        sig, validator = pair_signal(pairs, kps, vcfg, args.workers, args.seed, fit_validator=True)
        result["signal"] = sig
    load_before = os.getloadavg()[0]
    result["speed"] = time_queries(queries, kps, vcfg, validator, tuple(sorted({1, args.workers})))
    # other processes on the machine inflate wall times; the 1-minute load says by how much
    result["load_average"] = [load_before, os.getloadavg()[0]]

    if args.compare_methods:
        cmp = {}
        variants = {
            "magsac+magsac": ("magsac", "magsac"),
            "ransac+ransac": ("ransac", "ransac"),
            "ransac+magsac": ("ransac", "magsac"),
        }
        for name, (m1, m2) in variants.items():
            vc = replace(vcfg, homography=replace(vcfg.homography, first_method=m1, second_method=m2))
            entry = {"synthetic_warps": synthetic_warps(20, kcfg, vc, seed=args.seed)}
            if pairs:
                entry["real"], _ = pair_signal(pairs, kps, vc, args.workers, args.seed, fit_validator=False)
                entry["real"]["homography_cpu_ms_per_pair"] = homography_timing(pairs, kps, vc)
            cmp[name] = entry
        result["method_comparison"] = cmp

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwritten {args.out}")


def print_table(r: dict) -> None:
    print(f"data: {r['data']}; 1-min load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} "
          f"on {r['machine']['cpu_count']} cores during the timing")
    e = r["extraction"]
    print(f"extraction: {1000 * e['s_per_image']:.1f} ms/image (1 thread), median {e['keypoints_median']:.0f} keypoints")
    print(f"{'setting':<14}{'V':>4}{'ms/pair':>10}{'s/query':>10}{'max s/query':>13}{'cpu ms/pair':>13}{'cpu s/query':>13}")
    for name, s in r["speed"].items():
        print(f"{name:<14}{s['V']:>4}{s['ms_per_pair']:>10.1f}{s['s_per_query_mean']:>10.3f}{s['s_per_query_max']:>13.3f}"
              f"{s['cpu_ms_per_pair']:>13.1f}{s['cpu_s_per_query_mean']:>13.3f}")
    if "signal" in r:
        s = r["signal"]
        print(f"signal on {s['pairs']} real pairs ({s['pos']} same / {s['neg']} different): "
              f"AUC n_inliers {s['auc_n_inliers']:.3f}, n_inliers_accepted {s['auc_n_inliers_accepted']:.3f}, "
              f"n_matches {s['auc_n_matches']:.3f}, validator held-out {s.get('auc_validator_heldout', float('nan')):.3f}; "
              f"accepted geometry: {s['pos_accepted_frac']:.2f} of same, {s['neg_accepted_frac']:.2f} of different")
    if "method_comparison" in r:
        print(f"\n{'methods':<16}{'warp err med':>13}{'max':>8}{'fail':>6}{'inl':>6}{'AUC inl':>9}{'AUC acc':>9}"
              f"{'H cpu ms':>10}")
        for name, c in r["method_comparison"].items():
            w, re = c["synthetic_warps"], c.get("real", {})
            print(f"{name:<16}{w['corner_err_median_px']:>13.2f}{w['corner_err_max_px']:>8.2f}{w['failures']:>6d}"
                  f"{w['inliers_median']:>6.0f}{re.get('auc_n_inliers', float('nan')):>9.3f}"
                  f"{re.get('auc_n_inliers_accepted', float('nan')):>9.3f}"
                  f"{re.get('homography_cpu_ms_per_pair', float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
