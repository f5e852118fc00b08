"""faiss inner-product index over L2-normalised embeddings (= cosine), GPU when one exists.

The index is chosen by size: exact search (IndexFlatIP) up to `exact_max` photos, above that an
inverted-file index (IVF-Flat, about 4*sqrt(n) lists, `nprobe` of them searched per query).
Measured by `bench/scale.py` on 100k photos (1280-d, 2 cores, AMD EPYC): exact search 3.5 ms per
query and 0.5 GB; IVF with nprobe 32 / 64 / 128 0.8 / 1.4 / 2.6 ms per query at recall@50 0.91 /
0.987 / 0.9999 against exact search, after 20 s of training every time a command loads the
gallery. So exact search stays the better choice to a few hundred thousand photos; above that its
time (linear in the gallery) and memory make IVF worth its build.

With viewpoints, one sub-index per viewpoint: a query of known viewpoint searches only its own
(a left flank never meets a right flank); a query of unknown viewpoint searches all.

The engine searches whitened embeddings where the run folder has a whitening
(`fit_embedding_whitening`, fitted by `train-siamese` on the training individuals' gallery photos):
the directions in which photos of one animal differ (light, pose, framing) are shrunk before the
cosine, the ones that tell animals apart kept.
"""
from __future__ import annotations

import logging
from typing import Sequence

import faiss
import numpy as np

from core.errors import UserError
from core.runfolder import RunFolder
from core.whitening import Whitening, whitening_from_differences

log = logging.getLogger(__name__)


def _gpu_resources():
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


EXACT_MAX = 250_000  # photos; above this an IVF index
NPROBE = 128
_TRAIN_PER_LIST = 40  # k-means training points per list (faiss warns below 39)


def build_index(x: np.ndarray, gpu=None, exact_max: int = EXACT_MAX, nprobe: int = NPROBE, seed: int = 0):
    """An inner-product index over the rows of x: exact up to `exact_max` rows, IVF-Flat above."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, min(n, nlist * _TRAIN_PER_LIST), replace=False))]
        index.train(sample)
        index.nprobe = nprobe
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(gpu, 0, index)
    index.add(x)
    return index


class EmbeddingIndex:
    def __init__(self, embeddings: np.ndarray, viewpoints: Sequence[str | None] | None = None,
                 exact_max: int = EXACT_MAX):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.n = len(self.embeddings)
        gpu = _gpu_resources()
        self.device = "gpu" if gpu is not None else "cpu"
        self.exact = self.n <= exact_max
        self._build = lambda x: build_index(x, gpu, exact_max)
        self._by_view: dict[str, np.ndarray] = {}  # viewpoint -> the gallery photos its queries meet
        self._indexes: dict[str, object] = {}  # built when first searched
        self._unknown_view = np.arange(self.n)
        if viewpoints is not None and any(viewpoints):
            views = np.array([v or "" for v in viewpoints])
            self._unknown_view = np.flatnonzero(views == "")
            # a gallery photo of unknown viewpoint may show either side: every query meets it
            for v in sorted(set(views) - {""}):
                members = np.flatnonzero((views == v) | (views == ""))
                self._by_view[v] = members

    @property
    def views(self) -> list[str]:
        """The gallery's viewpoints (none: a gallery without viewpoints, met whole by every query)."""
        return sorted(self._by_view)

    def meets(self, view: str | None) -> np.ndarray:
        """(n,) True for the gallery photos a query of viewpoint `view` meets (the rule `search`
        follows): all of them when the view is unknown or the gallery has no viewpoints, else the
        photos of that view and those of unknown view (only these when the gallery lacks the view)."""
        mask = np.zeros(self.n, bool)
        if not view or not self._by_view:
            mask[:] = True
        else:
            mask[self._by_view.get(view, self._unknown_view)] = True
        return mask

    def _index(self, view: str | None, members: np.ndarray | None = None):
        """The index over `members` (None: every photo), built when first needed."""
        if view not in self._indexes:
            self._indexes[view] = self._build(self.embeddings if members is None else self.embeddings[members])
        return self._indexes[view]

    def search(self, queries: np.ndarray, k: int, viewpoints: Sequence[str | None] | None = None):
        """Top-k (scores, gallery indices) per query; -1 pads where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.n))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        idx = np.full((len(q), k), -1, dtype=np.int64)
        views = np.array([(v or "") for v in viewpoints]) if viewpoints is not None else np.full(len(q), "")
        # a gallery without viewpoints: every photo may show either side, so every query meets all
        plain = (views == "") | (not self._by_view)
        if plain.any():
            s, i = self._index(None).search(q[plain], k)
            scores[plain], idx[plain] = s, i
        # a known viewpoint the gallery lacks meets only the gallery photos of unknown viewpoint
        absent = ~plain & np.array([v not in self._by_view for v in views], dtype=bool)
        if absent.any():
            log.warning("%d queries have a viewpoint the gallery does not have (%s): they meet only gallery "
                        "photos of unknown viewpoint", int(absent.sum()), ", ".join(sorted(set(views[absent]))))
            if self._by_view and len(self._unknown_view):
                members = self._unknown_view
                kk = min(k, len(members))
                s, i = self._index("", members).search(q[absent], kk)
                rows = np.flatnonzero(absent)
                scores[rows, :kk] = s
                idx[rows, :kk] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        for v, members in self._by_view.items():
            rows = np.flatnonzero(views == v)
            if len(rows):
                kk = min(k, len(members))
                s, i = self._index(v, members).search(q[rows], kk)
                scores[rows, :kk] = s
                idx[rows, :kk] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        return scores, idx


class IndividualMeans:
    """The mean of each individual's gallery photos of one viewpoint (their embeddings as searched):
    a query's cosine to it tells how well the query fits the animal as a whole, where its cosine to
    one photo may be a chance resemblance (the embedding stage's score per individual,
    `MatchConfig.individual_weight`). Photos without a viewpoint are a group of their own."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str], viewpoints: Sequence[str | None]):
        self.embeddings = embeddings  # (the searched ones, not copied: the sums are float64)
        groups: dict[tuple, int] = {}
        self.group = np.array([groups.setdefault((i, v or ""), len(groups)) for i, v in zip(ids, viewpoints)],
                              dtype=np.int64)
        self.n_groups = len(groups)
        self._sums: tuple | None = None  # (members key, (groups, D) sums): one gallery subset at a time

    def sums(self, members: np.ndarray | None) -> np.ndarray:
        """Each group's sum of embeddings over the gallery photos `members` (None: all)."""
        key = None if members is None else members.tobytes()
        if self._sums is None or self._sums[0] != key:
            rows = np.arange(len(self.group)) if members is None else np.asarray(members, np.int64)
            sums = np.zeros((self.n_groups, self.embeddings.shape[1]))
            np.add.at(sums, self.group[rows], self.embeddings[rows])
            self._sums = (key, sums)
        return self._sums[1]

    def cosines(self, query: np.ndarray, gallery_idx: np.ndarray, hidden: np.ndarray = (),
                members: np.ndarray | None = None) -> np.ndarray:
        """(k,) the cosine of `query` (as searched) to the mean of the group of each photo in
        `gallery_idx`, over the photos `members` (None: all) but `hidden` (gallery indices: the
        query's own photos, which must not vouch for themselves)."""
        gallery_idx = np.asarray(gallery_idx, np.int64)
        if not len(gallery_idx):
            return np.zeros(0)
        groups, inverse = np.unique(self.group[gallery_idx], return_inverse=True)
        means = self.sums(members)[groups].copy()
        hidden = np.unique(np.asarray(hidden, np.int64))  # (a photo hidden twice leaves once)
        if members is not None:
            hidden = hidden[np.isin(hidden, members)]
        for h in hidden[hidden >= 0]:
            at = np.flatnonzero(groups == self.group[h])
            means[at] -= self.embeddings[h]
        norms = np.linalg.norm(means, axis=1)
        cos = np.where(norms > 1e-9, means @ np.asarray(query, np.float64) / np.maximum(norms, 1e-12), 0.0)
        return cos[inverse]


EMBEDDING_WHITENING_EPS = 0.01  # eigenvalue floor, x the largest (core.whitening; 0.01-0.1 measured alike)
MIN_WHITENING_PHOTOS = 20  # photos in groups of two or more; fewer: no whitening


def fit_embedding_whitening(embeddings: np.ndarray, ids: Sequence[str], viewpoints: Sequence[str | None],
                            eps: float = EMBEDDING_WHITENING_EPS,
                            min_photos: int = MIN_WHITENING_PHOTOS) -> Whitening | None:
    """The whitening of the embedding for search (`core.whitening`), fitted on labelled photos: the
    differences are each photo's embedding minus the mean of its individual's photos of the same
    viewpoint (groups of two or more photos), the sample all the photos. None when fewer than
    `min_photos` photos are in such groups."""
    x = np.asarray(embeddings, np.float64)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(ids, viewpoints)):
        groups.setdefault((str(key[0]), key[1] or ""), []).append(i)
    members = [g for g in groups.values() if len(g) > 1]
    if sum(len(g) for g in members) < min_photos:
        return None
    diff = np.concatenate([x[g] - x[g].mean(axis=0) for g in members])
    if not np.abs(diff).max() > 0:
        return None  # (each group's photos embed alike: duplicates)
    return whitening_from_differences(diff, x, eps)


def load_embedding_whitening(run: RunFolder, dim: int) -> Whitening | None:
    """The run folder's embedding whitening for embeddings of `dim` dimensions, None where it has none
    (runs from before it, or `train-siamese --no-whiten-embedding`)."""
    path = run.embedding_whitening_path
    if not path.is_file():
        return None
    try:
        whitening = Whitening.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}): run `cli.py train-siamese` again") from None
    if whitening.P.shape[1] != dim:
        raise UserError(f"{path} whitens {whitening.P.shape[1]}-dimensional embeddings, the gallery's have {dim}: "
                        "run `cli.py train-siamese` again")
    return whitening
