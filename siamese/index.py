"""faiss inner-product index over L2-normalised embeddings (= cosine), GPU when one exists.

With viewpoints, one sub-index per viewpoint: a query of known viewpoint searches only its own
(a left flank never meets a right flank); a query of unknown viewpoint searches all.
"""
from __future__ import annotations

import logging
from typing import Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _gpu_resources():
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


def _flat_ip(x: np.ndarray, gpu):
    index = faiss.IndexFlatIP(x.shape[1])
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(gpu, 0, index)
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


class EmbeddingIndex:
    def __init__(self, embeddings: np.ndarray, viewpoints: Sequence[str | None] | None = None):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.n = len(self.embeddings)
        gpu = _gpu_resources()
        self.device = "gpu" if gpu is not None else "cpu"
        self._all = _flat_ip(self.embeddings, gpu)
        self._by_view: dict[str, tuple[object, np.ndarray]] = {}
        self._unknown_view = np.arange(self.n)
        if viewpoints is not None and any(viewpoints):
            views = np.array([v or "" for v in viewpoints])
            self._unknown_view = np.flatnonzero(views == "")
            # a gallery photo of unknown viewpoint may show either side: every query meets it
            for v in sorted(set(views) - {""}):
                members = np.flatnonzero((views == v) | (views == ""))
                self._by_view[v] = (_flat_ip(self.embeddings[members], gpu), members)
        self._gpu = gpu

    def search(self, queries: np.ndarray, k: int, viewpoints: Sequence[str | None] | None = None):
        """Top-k (scores, gallery indices) per query; -1 pads where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.n))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        idx = np.full((len(q), k), -1, dtype=np.int64)
        views = np.array([(v or "") for v in viewpoints]) if viewpoints is not None else np.full(len(q), "")
        plain = views == ""
        if plain.any():
            s, i = self._all.search(q[plain], k)
            scores[plain], idx[plain] = s, i
        # a known viewpoint the gallery lacks meets only the gallery photos of unknown viewpoint
        absent = ~plain & np.array([v not in self._by_view for v in views], dtype=bool)
        if absent.any():
            log.warning("%d queries have a viewpoint the gallery does not have (%s): they meet only gallery "
                        "photos of unknown viewpoint", int(absent.sum()), ", ".join(sorted(set(views[absent]))))
            if self._by_view and len(self._unknown_view):
                members = self._unknown_view
                kk = min(k, len(members))
                s, i = _flat_ip(self.embeddings[members], self._gpu).search(q[absent], kk)
                rows = np.flatnonzero(absent)
                scores[rows, :kk] = s
                idx[rows, :kk] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        for v, (index, members) in self._by_view.items():
            rows = np.flatnonzero(views == v)
            if len(rows):
                kk = min(k, len(members))
                s, i = index.search(q[rows], kk)
                scores[rows, :kk] = s
                idx[rows, :kk] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        return scores, idx
