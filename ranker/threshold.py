"""Choosing the new-individual threshold tau, and the open-set folds it is chosen on.

`search_threshold` is a pure function of ranked scores and true IDs. MAP@5 as a function of tau
is a step function that only changes where tau crosses a candidate's score, so every tau in a
grid is scored exactly in one sweep (per query, only the position of `new_individual` depends on
tau, and it takes at most six values).

Tie-breaking (several taus with the same best MAP@5): the best grid points form runs of
consecutive grid points; the run spanning the widest tau interval wins (the lowest one if
equal), and within it the grid point nearest the interval's middle (the lower one if equal). The
middle of a plateau is the choice least sensitive to a small shift of the score distribution
between calibration and use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from core.metrics import NEW_INDIVIDUAL, average_precision_at_5

log = logging.getLogger(__name__)


class CurvePoint(NamedTuple):
    tau: float
    map5: float
    new_rate: float  # fraction of queries answered `new_individual` first


@dataclass(frozen=True)
class ThresholdResult:
    tau: float
    map5: float
    new_rate: float
    curve: list[CurvePoint] = field(repr=False)

    def to_dict(self) -> dict:
        return {"tau": self.tau, "map5": self.map5, "new_rate": self.new_rate,
                "curve": [list(p) for p in self.curve]}


def _clean(ranked: Sequence[tuple]) -> list[tuple[str, float]]:
    """The candidates `top5_with_new` would use: no `new_individual`, no repeated ID, first five."""
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for cand in ranked:
        ident = str(cand[0])
        if ident == NEW_INDIVIDUAL or ident in seen:
            continue
        seen.add(ident)
        out.append((ident, float(cand[1])))
        if len(out) == 5:
            break
    return out


def default_grid(queries: Sequence[Sequence[tuple]]) -> np.ndarray:
    """One tau per plateau: midpoints between consecutive distinct top-5 scores, plus one just
    below the lowest score (never new first) and one just above the highest (always new first)."""
    vals = np.array([s for q in queries for _, s in _clean(q)], dtype=np.float64)
    u = np.unique(vals[np.isfinite(vals)])
    if u.size == 0:
        return np.array([0.5])
    pad = 1e-6 * max(1.0, float(np.abs(u).max()))
    return np.concatenate([[u[0] - pad], (u[:-1] + u[1:]) / 2.0, [u[-1] + pad]])


def evaluate_thresholds(queries: Sequence[Sequence[tuple]], truths: Sequence[str],
                        grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAP@5 and new-first rate for every tau of an ascending grid."""
    if len(queries) != len(truths):
        raise ValueError(f"{len(queries)} ranked queries for {len(truths)} truths")
    if len(queries) == 0:
        raise ValueError("no queries to choose a threshold on")
    grid = np.asarray(grid, dtype=np.float64)
    G = grid.size
    ap_diff = np.zeros(G + 1)
    new_diff = np.zeros(G + 1)
    for ranked, truth in zip(queries, truths):
        cands = _clean(ranked)
        ids = [c[0] for c in cands]
        L = len(cands)
        # candidate j falls below tau exactly for grid indices >= c[j]; NaN never falls below
        c = np.array([G if np.isnan(s) else np.searchsorted(grid, s, side="right") for _, s in cands],
                     dtype=np.int64)
        m = np.minimum.accumulate(c) if L else c  # new goes before the first candidate below tau
        for p in range(L + 1):
            lo = int(m[p]) if p < L else 0
            hi = int(m[p - 1]) if p > 0 else G
            if hi <= lo:
                continue
            ap = average_precision_at_5(truth, (ids[:p] + [NEW_INDIVIDUAL] + ids[p:])[:5])
            ap_diff[lo] += ap
            ap_diff[hi] -= ap
            if p == 0:
                new_diff[lo] += 1
                new_diff[hi] -= 1
    n = len(queries)
    return np.cumsum(ap_diff)[:G] / n, np.cumsum(new_diff)[:G] / n


def _plateau_middle(grid: np.ndarray, best: np.ndarray) -> int:
    idx = np.flatnonzero(best)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    spans = [grid[r[-1]] - grid[r[0]] for r in runs]
    run = runs[int(np.argmax(spans))]  # argmax takes the first (lowest tau) among equal spans
    centre = (grid[run[0]] + grid[run[-1]]) / 2.0
    return int(run[int(np.argmin(np.abs(grid[run] - centre)))])


def search_threshold(queries: Sequence[Sequence[tuple]], truths: Sequence[str],
                     grid: Sequence[float] | None = None,
                     target_new_rate: float | None = None) -> ThresholdResult:
    """Grid-search tau for `top5_with_new`.

    `queries[i]` is query i's ranked (individual_id, score, ...) list, best first; `truths[i]` its
    true ID (`new_individual` for an individual absent from the gallery). Without
    `target_new_rate`, tau maximises MAP@5; with it, tau is the one whose fraction of queries
    answered `new_individual` first is closest to the target (MAP@5 breaks ties). Remaining ties:
    middle of the widest plateau (module docstring)."""
    g = default_grid(queries) if grid is None else np.unique(np.asarray(grid, dtype=np.float64))
    if g.size == 0 or not np.all(np.isfinite(g)):
        raise ValueError("threshold grid must be non-empty and finite")
    map5, rate = evaluate_thresholds(queries, truths, g)
    if target_new_rate is None:
        best = map5 >= map5.max() - 1e-12
    else:
        if not 0.0 <= target_new_rate <= 1.0:
            raise ValueError("target_new_rate must be within [0, 1]")
        dist = np.abs(rate - target_new_rate)
        near = dist <= dist.min() + 1e-12
        best = near & (map5 >= map5[near].max() - 1e-12)
    i = _plateau_middle(g, best)
    log.info("threshold: tau=%.4f MAP@5=%.4f new-first rate=%.3f over %d queries",
             g[i], map5[i], rate[i], len(queries))
    curve = [CurvePoint(float(t), float(a), float(r)) for t, a, r in zip(g, map5, rate)]
    return ThresholdResult(float(g[i]), float(map5[i]), float(rate[i]), curve)


# --- open-set folds ---------------------------------------------------------------------------

class OpenSetFold(NamedTuple):
    fold: int
    unseen: tuple[str, ...]  # individuals whose photos are all taken out of the gallery
    seen: tuple[str, ...]    # individuals kept in the gallery (some of their photos become queries)


class FoldSplit(NamedTuple):
    gallery: np.ndarray      # image indices forming the gallery
    queries: np.ndarray      # image indices used as queries
    truths: tuple[str, ...]  # per query: its individual, or `new_individual` if unseen


def open_set_folds(individuals: Sequence[str], n_folds: int, seed: int = 0) -> list[OpenSetFold]:
    """Split the distinct individuals into `n_folds` folds of near-equal size (seeded shuffle).

    In fold f, the fold's individuals play the unseen animals of a survey and everyone else is
    known; every individual is unseen in exactly one fold. `individuals` may repeat (one entry
    per image)."""
    uniq = sorted({str(i) for i in individuals})
    if n_folds < 2:
        raise ValueError("open-set calibration needs at least 2 folds")
    if len(uniq) < n_folds:
        raise ValueError(f"{len(uniq)} individuals cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    parts = [sorted(order[f::n_folds]) for f in range(n_folds)]
    return [OpenSetFold(f, tuple(parts[f]), tuple(sorted(set(uniq) - set(parts[f]))))
            for f in range(n_folds)]


def split_fold_images(image_individuals: Sequence[str], fold: OpenSetFold, seed: int = 0,
                      queries_per_seen: int | None = 1,
                      queries_per_unseen: int | None = 1) -> FoldSplit:
    """Images (by index) to gallery and queries for one open-set fold.

    - unseen individual: up to `queries_per_unseen` of its images are queries with truth
      `new_individual` (None = all); its other images are used neither as gallery nor query;
    - seen individual with n >= 2 images: min(`queries_per_seen`, n - 1) images are queries
      (None = n - 1), the rest gallery, so the gallery always holds at least one of its photos;
    - seen individual with one image: gallery only.
    With one query per individual, the share of new-individual queries is about 1 / n_folds
    (three folds: the third of new animals typical of a survey)."""
    names, inv = np.unique(np.asarray([str(i) for i in image_individuals], dtype=str), return_inverse=True)
    unseen, seen = set(fold.unseen), set(fold.seen)
    unknown = set(names.tolist()) - unseen - seen
    if unknown:
        raise ValueError(f"{len(unknown)} individual(s) in neither part of the fold, e.g. {sorted(unknown)[:3]}")
    rng = np.random.default_rng([seed, fold.fold])
    by_name = np.argsort(inv, kind="stable")
    bounds = np.cumsum(np.bincount(inv, minlength=names.size))
    gallery: list[int] = []
    queries: list[int] = []
    truths: list[str] = []
    for j, name in enumerate(names.tolist()):
        idx = by_name[(bounds[j - 1] if j else 0):bounds[j]]
        idx = idx[rng.permutation(idx.size)]
        if name in unseen:
            k = idx.size if queries_per_unseen is None else min(queries_per_unseen, idx.size)
            queries.extend(idx[:k].tolist())
            truths.extend([NEW_INDIVIDUAL] * k)
        else:
            k = idx.size - 1 if queries_per_seen is None else min(queries_per_seen, idx.size - 1)
            queries.extend(idx[:k].tolist())
            truths.extend([name] * k)
            gallery.extend(idx[k:].tolist())
    order = np.argsort(queries, kind="stable")
    return FoldSplit(np.sort(np.asarray(gallery, dtype=np.int64)),
                     np.asarray(queries, dtype=np.int64)[order],
                     tuple(truths[i] for i in order))
