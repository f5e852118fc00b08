"""k-reciprocal re-ranking of a query's shortlist (after Zhong et al., CVPR 2017, without the
Gaussian-weighted encoding): two photos of one animal tend to be in each other's nearest
neighbours, a look-alike of another animal often only in one direction.

  R(q)  the query's k-reciprocal set: the gallery photos among its k nearest whose own k nearest
        gallery neighbours it would enter (its similarity reaches their k-th neighbour's);
  R(g)  a gallery photo's: g and the photos among its k nearest gallery neighbours that have g
        among theirs;
  s'    = (1 - lam) * s + lam * |R(q) & R(g)| / |R(q) | R(g)|   (Jaccard similarity of the sets).

Pure numpy: the engine supplies the gallery's neighbour lists (`siamese.index.EmbeddingIndex`).
"""
from __future__ import annotations

import numpy as np


def gallery_reciprocal_sets(neighbours: np.ndarray) -> list[frozenset[int]]:
    """R(g) for every gallery photo, from (n, k) neighbour indices (itself excluded, -1 padding)."""
    near = [set(int(h) for h in row if h >= 0) for row in neighbours]
    return [frozenset({g} | {h for h in near[g] if g in near[h]}) for g in range(len(near))]


def k_reciprocal_rescore(sims: np.ndarray, idx: np.ndarray, kth: np.ndarray, sets: list[frozenset[int]],
                         k: int, lam: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """One query's shortlist (similarities `sims`, gallery indices `idx`, best first) re-scored and
    re-sorted (stable). `kth[g]`: gallery photo g's similarity to its k-th nearest gallery neighbour."""
    sims = np.asarray(sims, dtype=np.float64)
    idx = np.asarray(idx)
    head = [int(g) for g, s in zip(idx[:k], sims[:k]) if g >= 0 and s >= kth[g]]
    rq = set(head)
    jac = np.array([len(rq & sets[g]) / len(rq | sets[g]) if rq else 0.0 for g in idx.astype(int)])
    new = (1.0 - lam) * sims + lam * jac
    order = np.argsort(-new, kind="stable")
    return new[order], idx[order]
