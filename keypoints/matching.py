"""Descriptor matching between two images: faiss exact kNN, Lowe's ratio test, mutual check."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Matches:
    """Putative correspondences: `idx[:, 0]` into image a, `idx[:, 1]` into image b."""

    idx: np.ndarray  # int64 (m, 2)
    dist: np.ndarray  # float32 (m,), L2 distance of the RootSIFT pair (0..sqrt 2)
    ratio: np.ndarray  # float32 (m,), best / second-best distance in b (lower = more distinctive)

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def empty(cls) -> "Matches":
        return cls(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))


def _knn(query: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    return index.search(query, k)  # squared L2 distances, indices


def match_descriptors(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float = 0.8,
                      mutual: bool = True) -> Matches:
    """Match each descriptor of a to its nearest neighbour in b, keeping a match when
    d1 < ratio * d2 (Lowe) and, with `mutual`, when a's point is also b's point's nearest in a.

    Fewer than 2 descriptors in b leaves the ratio test undefined: no matches."""
    a = np.ascontiguousarray(desc_a, dtype=np.float32)
    b = np.ascontiguousarray(desc_b, dtype=np.float32)
    if len(a) == 0 or len(b) < 2:
        return Matches.empty()
    d2, nn = _knn(a, b, 2)
    d2 = np.maximum(d2, 0.0)  # faiss's expanded-form distances can be slightly negative
    # ratio test on distances, i.e. on squared distances with ratio^2
    keep = (d2[:, 0] < (ratio * ratio) * d2[:, 1]) & (nn[:, 0] >= 0)
    ia = np.flatnonzero(keep)
    ib = nn[ia, 0]
    if mutual and len(ia):
        # only the b points that survived the ratio test need a reverse search: much cheaper
        # than searching all of b against a
        ub, inv = np.unique(ib, return_inverse=True)
        _, back = _knn(np.ascontiguousarray(b[ub]), a, 1)
        ok = back[inv, 0] == ia
        ia, ib = ia[ok], ib[ok]
    dist = np.sqrt(d2[ia, 0]).astype(np.float32)
    rat = (np.sqrt(d2[ia, 0]) / np.maximum(np.sqrt(d2[ia, 1]), 1e-12)).astype(np.float32)
    return Matches(np.stack([ia, ib], axis=1).astype(np.int64), dist, rat)
