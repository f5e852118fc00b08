"""LAP hard-negative mining for Siamese training.

The miner takes a score matrix between training images (higher = more similar: cosine similarities
of embeddings, or the pair head's logits) and the images' individual IDs, and returns index pairs.
It knows nothing about images, models or epochs:

- ``LapMiner(config).mine_negatives(scores, labels, noise_scale, rng)``: every image gets one hard
  negative of another individual, and every image is used exactly once as a negative (a linear
  assignment on ``-(z + K * noise)``, same-individual cells forbidden, recently used pairs
  penalised).
- ``LapMiner(config).mine_negatives_topk(neighbors, neighbor_scores, labels, noise_scale, rng)``:
  the same from a sparse top-k candidate list (what ``faiss.Index.search`` returns), for training
  sets whose dense matrix would not fit in memory (50k x 50k float32 is 10 GB).

Score scale. ``z = (score - mean) / std``, where mean and std are those of the valid
(off-diagonal, different-individual) cells of a dense matrix, estimated on a sample. The noise
``K * N(0, 1)`` and the recent-pair penalty are in these units, so one schedule serves cosines and
logits alike: ``K = 4`` makes the choice mostly random, ``K = 0.25`` keeps nearly the hardest
negatives. A top-k input has no view of the bulk of the distribution: pass ``random_neighbors`` /
``random_scores`` (a few random pairs per image with their true scores) to get the same units and
behaviour; without them the units are the std of the valid top-k scores (a smaller std, the tail
only) and a large K only shuffles among the candidates.

Scale. Up to ``block_size`` images a dense matrix is solved exactly (``lap.lapjv``, O(n^3)). Past
that, and always for top-k input, the solve runs on a sparse candidate graph with ``lap.lapmod``:
each row's ``topk`` best valid columns, ``random_candidates`` random columns and a fallback
permutation (cost above every real edge) that guarantees a perfect assignment exists in the graph.
A random column stands for the many columns outside the top-k: its noise is the best of that many
draws, so a large K picks among the bulk about as often as the exact solve would. On synthetic
embeddings this graph gives the same mean negative score as the exact solve (3 digits, K <= 0.25)
several times faster. One lapmod call grows faster than linearly (bench/lap_mining.py, 2 loaded
CPUs: 0.2 s at 5k images, 1.8 s at 20k, 8-22 s at 50k), so past ``sparse_block_size`` images the
graph is cut into blocks of similar images (recursive splits along the principal axis of a spectral
embedding of the graph), each solved by lapmod, which keeps the time linear in n (2.6-7 s at 50k in
3 blocks). Edges between blocks are lost: the mean negative score drops by ~3% at 50k (3 blocks)
on the isotropic synthetic benchmark, whose individuals' centres are random in 256-d so that no
partition keeps neighbourhoods; planted look-alike individuals stay in the same block
(tests/test_lap_miner.py).

Feasibility. A perfect assignment without same-individual pairs exists iff no individual owns more
than half of the images. When one does (m of n images, m > n/2), the miner returns the best valid
partial assignment: ``2 * (n - m)`` pairs (every other image and n - m of the big individual's
images), each anchor and each negative used at most once; see ``max_negative_pairs``. When a block
partition leaves rows unmatched that a global solve could match (a block where one individual owns
more than half of the images), the whole graph is re-solved once with lapmod.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import lap
import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

logger = logging.getLogger(__name__)

# lapmod rejects costs at or above lap.LARGE.
_LAPMOD_MAX_COST = 0.5 * float(lap.LARGE)


@dataclass(frozen=True)
class MinerConfig:
    """Settings of the LAP miner.

    block_size: dense input up to this many images is solved exactly (lapjv on the whole matrix,
        ~0.6-1 s at 2000 images here); past it, on its sparse top-k graph (same quality, several
        times faster).
    sparse_block_size: the sparse graph is solved in one lapmod call up to this many images, in
        blocks of at most this many past it (lapmod grows faster than linearly).
    topk: candidates per row taken from a dense matrix past ``block_size``.
    random_candidates: random extra columns per row on the sparse graph.
    recent_penalty: penalty (in std units of the scores) on a pair used by the previous call.
    recent_memory: how many previous calls are remembered.
    recent_decay: the penalty is multiplied by this for each older call.
    projection_dim: dimensions of the spectral embedding used to partition images into blocks.
    stats_sample: valid cells sampled to estimate the mean and std of a dense matrix.
    """

    block_size: int = 2000
    sparse_block_size: int = 20000
    topk: int = 32
    random_candidates: int = 4
    recent_penalty: float = 3.0
    recent_memory: int = 3
    recent_decay: float = 0.5
    projection_dim: int = 16
    stats_sample: int = 200_000

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.sparse_block_size < 2:
            raise ValueError("block sizes must be at least 2")
        if self.topk < 1 or self.random_candidates < 0 or self.recent_memory < 0:
            raise ValueError("topk must be >= 1, random_candidates and recent_memory >= 0")
        if self.recent_penalty < 0 or not 0 <= self.recent_decay <= 1:
            raise ValueError("recent_penalty must be >= 0 and recent_decay in [0, 1]")


MINER_PRESETS: dict[str, MinerConfig] = {
    "default": MinerConfig(),
    # Exact up to 4000 images, one graph (no blocks) up to 100k: a few seconds more per call.
    "quality": MinerConfig(block_size=4000, sparse_block_size=100_000),
    # For quick experiments on big sets: smaller exact solves and blocks.
    "fast": MinerConfig(block_size=1000, sparse_block_size=10_000),
}


@dataclass(frozen=True)
class MiningInfo:
    """What the last mining call did (for logs and benchmarks)."""

    method: str  # "dense-exact", ["dense-topk "] "sparse" | "sparse-blocks" [+ "+repair"]
    n_images: int
    n_pairs: int
    max_pairs: int
    n_blocks: int
    seconds: float


def noise_at(progress: float, start: float = 4.0, end: float = 0.25) -> float:
    """K at a fraction ``progress`` in [0, 1] of training (of the epochs, or of a time budget)."""
    if start < 0 or end < 0:
        raise ValueError("noise scales must be >= 0")
    t = min(max(float(progress), 0.0), 1.0)
    if start > 0 and end > 0:
        return float(start * (end / start) ** t)
    return float(start + (end - start) * t)


def max_negative_pairs(labels: Sequence[Hashable] | np.ndarray) -> int:
    """Size of the largest valid negative assignment: n, or 2 * (n - m) when one individual owns
    m > n / 2 of the n images."""
    codes = _encode_labels(labels)
    n = len(codes)
    if n == 0:
        return 0
    m = int(np.bincount(codes).max())
    return n if 2 * m <= n else 2 * (n - m)


class LapMiner:
    """Hard-negative miner that remembers the pairs it returned in its last ``recent_memory``
    calls and penalises them (``recent_penalty * recent_decay ** (age - 1)``, age 1 = previous call;
    a pair is penalised in both directions). The memory is by image index: keep the same image order
    between calls (it is cleared when the number of images changes, or by ``reset()``)."""

    def __init__(self, config: MinerConfig | None = None) -> None:
        self.config = config or MinerConfig()
        self._history: deque[np.ndarray] = deque(maxlen=max(self.config.recent_memory, 1))
        self._n: int | None = None
        self.last_info: MiningInfo | None = None

    def state(self) -> dict:
        """The memory of recent pairs, to checkpoint (a resumed training mines as it would have)."""
        return {"history": [h.copy() for h in self._history], "n": self._n}

    def load_state(self, state: dict) -> None:
        self._history.clear()
        self._history.extend(np.asarray(h, np.int64) for h in state["history"])
        self._n = state["n"]

    def reset(self) -> None:
        """Forget the recently used pairs."""
        self._history.clear()
        self._n = None

    def mine_negatives(
        self,
        scores: np.ndarray,
        labels: Sequence[Hashable] | np.ndarray,
        noise_scale: float,
        rng: np.random.Generator | int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One hard negative per image from a dense (n, n) score matrix (higher = more similar).
        Returns int64 ``(anchor_idx, negative_idx)`` sorted by anchor: a permutation of all images
        with no same-individual pair, or the best valid partial one (see module docstring). Up to
        ``block_size`` images the assignment is the exact optimum; past it, it is solved on the
        graph of each row's ``topk`` best valid columns plus ``random_candidates`` random ones."""
        start = time.perf_counter()
        rng = np.random.default_rng(rng)
        codes = _encode_labels(labels)
        scores = np.asarray(scores)
        n = len(codes)
        if scores.shape != (n, n):
            raise ValueError(f"scores must be ({n}, {n}) for {n} labels, got {scores.shape}")
        _check_noise(noise_scale)
        if n and not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        self._sync(n)
        penalty = self._penalty_table(n)
        cfg = self.config
        mean, std = _dense_stats(scores, codes, cfg.stats_sample, rng)
        if n <= cfg.block_size:
            anchors, negatives = _solve_dense(scores, codes, mean, std, noise_scale, penalty, rng)
            return self._finish(anchors, negatives, codes, "dense-exact", 1, start)
        er, ec, ez = _dense_topk_edges(scores, codes, mean, std, cfg.topk)

        def random_z(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            return (np.asarray(scores[rows, cols], np.float64) - mean) / std

        cand = _Candidates(er, ec, ez, np.zeros(len(er), bool), random_z, True)
        anchors, negatives, n_blocks, method = _solve_graph(
            cand, codes, noise_scale, penalty, cfg, rng
        )
        return self._finish(anchors, negatives, codes, "dense-topk " + method, n_blocks, start)

    def mine_negatives_topk(
        self,
        neighbors: np.ndarray,
        neighbor_scores: np.ndarray,
        labels: Sequence[Hashable] | np.ndarray,
        noise_scale: float,
        rng: np.random.Generator | int | None,
        *,
        random_neighbors: np.ndarray | None = None,
        random_scores: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One hard negative per image from top-k candidates: ``neighbors[i]`` are image indices
        (-1 = missing, as faiss pads) and ``neighbor_scores[i]`` their scores with image i (higher =
        more similar), e.g. ``neighbor_scores, neighbors = index.search(embeddings, k)``. Self and
        same-individual candidates are ignored. Same output contract as ``mine_negatives``.

        Optionally ``random_neighbors`` (n, r) random columns per row and ``random_scores`` their
        true scores (cheap for the caller: r dot products or pair-head calls per image). They tell
        the miner what the bulk of the score distribution looks like: z-scores then use their mean
        and std, as the dense path does, and a large K gives near-random negatives as it does there.
        Without them, z-scores use the top-k scores' mean and std and a large K only shuffles among
        the top-k (plus random columns scored at the row's weakest candidate score)."""
        start = time.perf_counter()
        rng = np.random.default_rng(rng)
        codes = _encode_labels(labels)
        n = len(codes)
        _check_noise(noise_scale)
        er, ec, sc = _valid_edges(neighbors, neighbor_scores, codes, "neighbors")
        if (random_neighbors is None) != (random_scores is None):
            raise ValueError("give both random_neighbors and random_scores, or neither")
        self._sync(n)
        penalty = self._penalty_table(n)
        if random_neighbors is None:
            mean, std = _mean_std(sc)
            ez = (sc - mean) / std
            proxy = _row_proxy(n, er, ez)
            bulk = np.zeros(len(er), bool)
            random_is_bulk = False
        else:
            rr, rc, rs = _valid_edges(random_neighbors, random_scores, codes, "random_neighbors")
            mean, std = _mean_std(rs)
            rz = (rs - mean) / std
            # A random column's best guess is the row's mean random score.
            counts = np.bincount(rr, minlength=n)
            proxy = np.where(
                counts > 0, np.bincount(rr, weights=rz, minlength=n) / np.maximum(counts, 1), 0.0
            )
            bulk = np.r_[np.zeros(len(er), bool), np.ones(len(rr), bool)]
            er, ec, ez = np.r_[er, rr], np.r_[ec, rc], np.r_[(sc - mean) / std, rz]
            random_is_bulk = True

        def random_z(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            return proxy[rows]

        cand = _Candidates(er, ec, ez, bulk, random_z, random_is_bulk)
        anchors, negatives, n_blocks, method = _solve_graph(
            cand, codes, noise_scale, penalty, self.config, rng
        )
        return self._finish(anchors, negatives, codes, method, n_blocks, start)

    def _sync(self, n: int) -> None:
        if self._n is not None and self._n != n:
            logger.warning(
                "number of images changed (%d -> %d): forgetting recent pairs", self._n, n
            )
            self._history.clear()
        self._n = n

    def _penalty_table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unordered-pair keys (min * n + max) and their summed penalties."""
        cfg = self.config
        if cfg.recent_memory == 0 or cfg.recent_penalty == 0 or not self._history:
            return np.empty(0, np.int64), np.empty(0)
        calls = list(reversed(self._history))  # newest first: age 1, 2, ...
        weights = [
            np.full(len(keys), cfg.recent_penalty * cfg.recent_decay**age)
            for age, keys in enumerate(calls)
        ]
        keys, inverse = np.unique(np.concatenate(calls), return_inverse=True)
        return keys, np.bincount(inverse, weights=np.concatenate(weights))

    def _finish(self, anchors, negatives, codes, method, n_blocks, start):
        n = len(codes)
        order = np.argsort(anchors, kind="stable")
        anchors = anchors[order].astype(np.int64)
        negatives = negatives[order].astype(np.int64)
        if self.config.recent_memory > 0:
            self._history.append(np.unique(_pair_keys(anchors, negatives, n)))
        self.last_info = MiningInfo(
            method, n, len(anchors), max_negative_pairs(codes), n_blocks,
            time.perf_counter() - start,
        )
        logger.debug("%s", self.last_info)
        return anchors, negatives


def _valid_edges(neighbors, scores, codes, name):
    """Flatten (n, k) neighbour indices and scores into valid edges (no padding, no self, no
    same-individual pair)."""
    n = len(codes)
    neighbors = np.asarray(neighbors)
    scores = np.asarray(scores)
    if neighbors.ndim != 2 or neighbors.shape[0] != n or scores.shape != neighbors.shape:
        raise ValueError(
            f"{name} and its scores must both be ({n}, k), got {neighbors.shape} and {scores.shape}"
        )
    if neighbors.size and neighbors.max() >= n:
        raise ValueError(f"{name} holds indices >= the number of labels")
    rows = np.repeat(np.arange(n, dtype=np.int64), neighbors.shape[1])
    cols = neighbors.reshape(-1).astype(np.int64)
    keep = cols >= 0
    keep[keep] = codes[rows[keep]] != codes[cols[keep]]
    values = scores.reshape(-1)[keep].astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"scores of {name} contain NaN or infinite values")
    return rows[keep], cols[keep], values


def _check_noise(noise_scale: float) -> None:
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")


def _encode_labels(labels: Sequence[Hashable] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    if arr.ndim == 1 and arr.dtype.kind in "iub":
        return np.unique(arr, return_inverse=True)[1].astype(np.int64)
    codes: dict[Hashable, int] = {}
    return np.array([codes.setdefault(label, len(codes)) for label in labels], dtype=np.int64)


def _pair_keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    return np.minimum(a, b) * n + np.maximum(a, b)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return 0.0, 1.0
    std = float(values.std())
    return float(values.mean()), std if std > 1e-12 else 1.0


def _dense_stats(scores, codes, sample, rng) -> tuple[float, float]:
    n = len(codes)
    if n * n <= sample:
        i, j = np.divmod(np.arange(n * n), n)
    else:
        i, j = rng.integers(0, n, sample), rng.integers(0, n, sample)
    valid = codes[i] != codes[j]
    return _mean_std(np.asarray(scores[i[valid], j[valid]], np.float64))


def _fallback_permutation(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with as many valid (different-individual) cells as possible.

    Images are ordered by individual (random individual order, random order inside) and each one is
    sent s places further round the circle. A pair is same-individual only if an individual's run is
    longer than s or than n - s, so any s in [m, n - m] (m = largest individual) is valid when
    m <= n / 2; otherwise s = m gives the maximum 2 * (n - m) valid cells."""
    n = len(codes)
    counts = np.bincount(codes)
    m = int(counts.max())
    order = np.lexsort((rng.random(n), rng.random(len(counts))[codes]))
    shift = int(rng.integers(m, n - m + 1)) if 2 * m <= n else m
    perm = np.empty(n, np.int64)
    perm[order] = order[(np.arange(n) + shift) % n]
    return perm


def _solve_dense(scores, codes, mean, std, noise_scale, penalty, rng):
    """Exact assignment on the whole dense matrix (lapjv)."""
    n = len(codes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    cost = -(np.asarray(scores, np.float64) - mean) / std
    if noise_scale > 0:
        cost -= noise_scale * rng.standard_normal((n, n))
    pkeys, pweights = penalty
    if len(pkeys):
        u, v = np.divmod(pkeys, n)
        cost[u, v] += pweights  # keys are unique unordered pairs: no repeated cell
        cost[v, u] += pweights
    forbidden = codes[:, None] == codes[None, :]
    if forbidden.all():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    allowed = cost[~forbidden]
    lo, hi = float(allowed.min()), float(allowed.max())
    cost -= lo
    # Large enough that using one forbidden cell never pays: the solver first maximises the number
    # of valid pairs (only < n when one individual owns most images), then their score.
    cost[forbidden] = (hi - lo + 1.0) * (n + 1)
    x = lap.lapjv(cost, return_cost=False)[0].astype(np.int64)
    rows = np.arange(n)
    keep = ~forbidden[rows, x]
    return rows[keep], x[keep]


@dataclass(frozen=True)
class _Candidates:
    """Valid candidate edges row -> col with z-scores. ``bulk`` marks random columns that stand for
    the many columns outside the top-k (their noise is the best of that many draws, see
    ``_solve_sparse_block``); ``random_z(rows, cols)`` scores the miner's own random columns and
    ``random_is_bulk`` says whether those scores are a bulk estimate (True) or only an upper
    bound (False: then they get plain noise)."""

    rows: np.ndarray
    cols: np.ndarray
    z: np.ndarray
    bulk: np.ndarray
    random_z: Callable[[np.ndarray, np.ndarray], np.ndarray]
    random_is_bulk: bool


def _solve_graph(cand: _Candidates, codes, noise_scale, penalty, cfg, rng):
    """Assignment on the candidate graph: one lapmod call up to ``sparse_block_size`` images, else
    one per block of similar images, and one global call when the blocks left rows unmatched that
    could be matched."""
    n = len(codes)
    target = max_negative_pairs(codes)
    if n <= cfg.sparse_block_size:
        blocks = [np.arange(n)]
    else:
        top = ~cand.bulk
        coords = _graph_coordinates(
            n, cand.rows[top], cand.cols[top], cand.z[top], cfg.projection_dim, rng
        )
        blocks = _partition(coords, cfg.sparse_block_size)
    block_of = _block_index(blocks, n)
    inside = np.flatnonzero(block_of[cand.rows] == block_of[cand.cols])
    groups = _group(block_of[cand.rows[inside]], len(blocks))
    rows, cols = [], []
    for block, edges in zip(blocks, groups):
        r, c = _solve_sparse_block(
            block, inside[edges], cand, codes, noise_scale, penalty, cfg.random_candidates, rng
        )
        rows.append(r)
        cols.append(c)
    anchors, negatives = np.concatenate(rows), np.concatenate(cols)
    method = "sparse" if len(blocks) == 1 else "sparse-blocks"
    if len(anchors) < target and len(blocks) > 1:
        logger.info(
            "block partition matched %d of %d possible negatives; re-solving the whole graph",
            len(anchors), target,
        )
        anchors, negatives = _solve_sparse_block(
            np.arange(n), np.arange(len(cand.rows)), cand, codes, noise_scale, penalty,
            cfg.random_candidates, rng,
        )
        method += "+repair"
    return anchors, negatives, len(blocks), method


def _solve_sparse_block(block, edges, cand, codes, noise_scale, penalty, random_candidates, rng):
    """lapmod on the candidate ``edges`` (indices into ``cand``, both ends in the sorted ``block``)
    plus random columns and a fallback permutation; returns the valid pairs (global ids)."""
    n = len(codes)
    m = len(block)
    if m < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    local = codes[block]
    n_edges = len(edges)
    rr = np.repeat(np.arange(m), random_candidates)
    rc = rng.integers(0, m, len(rr))
    fallback = _fallback_permutation(local, rng)
    rows = np.concatenate([np.searchsorted(block, cand.rows[edges]), rr, np.arange(m)])
    cols = np.concatenate([np.searchsorted(block, cand.cols[edges]), rc, fallback])
    # 0 = candidate, 1 = random column, 2 = fallback permutation
    kind = np.repeat(np.array([0, 1, 2], np.int8), [n_edges, len(rr), m])
    valid = local[rows] != local[cols]
    keep = valid | (kind == 2)
    # np.unique keeps the first occurrence: a candidate wins over a random or fallback copy, and
    # the result comes sorted by row then column, as lapmod wants.
    _, first = np.unique(rows[keep] * m + cols[keep], return_index=True)
    take = np.flatnonzero(keep)[first]
    rows, cols, valid, kind = rows[take], cols[take], valid[take], kind[take]
    z = np.zeros(len(take))
    bulk = np.zeros(len(take), bool)
    is_cand, is_random = kind == 0, kind == 1
    z[is_cand] = cand.z[edges[take[is_cand]]]
    bulk[is_cand] = cand.bulk[edges[take[is_cand]]]
    z[is_random] = cand.random_z(block[rows[is_random]], block[cols[is_random]])
    bulk[is_random] = cand.random_is_bulk
    real = kind != 2
    cost = -z[real]
    if noise_scale > 0:
        cost -= noise_scale * _edge_noise(rows[real], bulk[real], m, rng)
    pkeys, pweights = penalty
    if len(pkeys) and len(cost):
        keys = _pair_keys(block[rows[real]], block[cols[real]], n)
        pos = np.minimum(np.searchsorted(pkeys, keys), len(pkeys) - 1)
        cost += np.where(pkeys[pos] == keys, pweights[pos], 0.0)
    cc = np.empty(len(rows))
    if len(cost):
        lo, hi = float(cost.min()), float(cost.max())
        cc[real] = (cost - lo) / max(hi - lo, 1e-12)  # real edges in [0, 1]
    cc[(kind == 2) & valid] = 2.0
    # Same-individual fallback cells (only present when one individual owns most of the block):
    # expensive enough that the solver first maximises the number of valid pairs.
    cc[~valid] = min(2.0 * (m + 2), _LAPMOD_MAX_COST)
    ii = np.r_[0, np.cumsum(np.bincount(rows, minlength=m))]
    x = lap.lapmod(m, cc, ii, cols, return_cost=False)[0].astype(np.int64)
    good = local[x] != local
    return block[np.flatnonzero(good)], block[x[good]]


def _edge_noise(rows, bulk, m, rng):
    """Standard normal noise per edge, except that a bulk edge of row i stands for
    M_i = (columns of the row outside its top-k) / (its bulk edges) columns and gets the maximum of
    M_i draws (inverse CDF of U ** (1 / M_i)). With a large K the solver then picks among the
    bulk about as often as an exact solve on the dense matrix would."""
    noise = rng.standard_normal(len(rows))
    if bulk.any():
        n_top = np.bincount(rows[~bulk], minlength=m)
        n_bulk = np.bincount(rows[bulk], minlength=m)
        represented = np.maximum((m - 1 - n_top) / np.maximum(n_bulk, 1), 1.0)[rows[bulk]]
        u = np.clip(rng.random(int(bulk.sum())), 1e-300, None)
        noise[bulk] = ndtri(np.exp(np.log(u) / represented))
    return noise


def _row_proxy(n: int, er: np.ndarray, ez: np.ndarray) -> np.ndarray:
    """Score assumed for a random column of row i: its weakest known candidate score (the true score
    of a column outside the top-k is at most that)."""
    proxy = np.full(n, np.inf)
    np.minimum.at(proxy, er, ez)
    missing = ~np.isfinite(proxy)
    proxy[missing] = ez.min() if len(ez) else 0.0
    return proxy


def _dense_topk_edges(scores, codes, mean, std, k, chunk=1024):
    """Each row's k best valid columns of a dense matrix, as edges with z-scores."""
    n = len(codes)
    k = min(k, n - 1)
    rows, cols, zs = [], [], []
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        block = np.array(scores[idx], dtype=np.float32)  # a copy: forbidden cells are overwritten
        block[codes[idx][:, None] == codes[None, :]] = -np.inf
        top = np.argpartition(block, n - k, axis=1)[:, n - k:]
        ok = np.isfinite(np.take_along_axis(block, top, axis=1)).ravel()
        r, c = np.repeat(idx, k)[ok], top.ravel()[ok].astype(np.int64)
        rows.append(r)
        cols.append(c)
        zs.append((np.asarray(scores[r, c], np.float64) - mean) / std)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(zs)


def _graph_coordinates(n, rows, cols, z, dim, rng, iterations=10) -> np.ndarray:
    """Spectral-like coordinates of the symmetrised candidate graph: randomised subspace iteration
    on the lazy walk (I + D^-1/2 A D^-1/2) / 2, O(edges * dim) per iteration. The lazy walk damps
    the oscillation between an individual's images and its look-alike's (valid edges only join
    different individuals, so tight pairs of individuals form near-bipartite subgraphs). An edge
    weighs exp(z - the row's best z): a row's few much-better candidates dominate its many
    near-average ones."""
    best = np.full(n, -np.inf)
    np.maximum.at(best, rows, z)
    weights = np.exp(z - best[rows]).astype(np.float32)
    diagonal = np.arange(n)
    adj = sp.csr_matrix(  # duplicate entries (mutual neighbours) are summed
        (
            np.r_[weights, weights, np.ones(n, np.float32)],
            (np.r_[rows, cols, diagonal], np.r_[cols, rows, diagonal]),
        ),
        shape=(n, n),
    )
    inv_sqrt_deg = (1.0 / np.sqrt(np.asarray(adj.sum(axis=1)).ravel())).astype(np.float32)
    adj.data *= inv_sqrt_deg[np.repeat(diagonal, np.diff(adj.indptr))] * inv_sqrt_deg[adj.indices]
    x = rng.standard_normal((n, min(dim, n))).astype(np.float32)
    for _ in range(iterations):
        x = _orthonormal_columns(0.5 * (adj @ x + x))
    return _unit_rows(x.astype(np.float64))


def _orthonormal_columns(x: np.ndarray) -> np.ndarray:
    """Cholesky QR: much cheaper than np.linalg.qr for tall, thin matrices; QR when the columns
    are too close to dependent for it."""
    gram = (x.T @ x).astype(np.float64)
    gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
    try:
        return x @ np.linalg.inv(np.linalg.cholesky(gram)).T.astype(x.dtype)
    except np.linalg.LinAlgError:
        return np.linalg.qr(x)[0]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _partition(coords: np.ndarray, max_size: int) -> list[np.ndarray]:
    """Split into ceil(n / max_size) near-equal parts of nearby points: recursive splits along each
    part's principal axis, at the quantile that keeps the parts' sizes balanced. Returns sorted
    index arrays, in a deterministic order."""
    blocks = []
    stack = [(np.arange(len(coords)), -(-len(coords) // max_size))]
    while stack:
        idx, parts = stack.pop()
        if parts <= 1:
            blocks.append(np.sort(idx))
            continue
        y = coords[idx] - coords[idx].mean(axis=0)
        axis = np.linalg.eigh(y.T @ y)[1][:, -1]
        left_parts = parts // 2
        cut = len(idx) * left_parts // parts
        split = np.argpartition(y @ axis, cut)
        stack.append((idx[split[cut:]], parts - left_parts))
        stack.append((idx[split[:cut]], left_parts))
    return blocks


def _block_index(blocks: list[np.ndarray], n: int) -> np.ndarray:
    block_of = np.empty(n, np.int64)
    for b, idx in enumerate(blocks):
        block_of[idx] = b
    return block_of


def _group(block_ids: np.ndarray, n_blocks: int) -> list[np.ndarray]:
    order = np.argsort(block_ids, kind="stable")
    return np.split(order, np.cumsum(np.bincount(block_ids, minlength=n_blocks))[:-1])
