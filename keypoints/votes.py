"""Keypoint votes: a second source of candidates, beside the embedding's shortlist.

Every gallery photo's strongest RootSIFT descriptors go into one faiss index. Each descriptor of a
query photo looks up its K nearest gallery descriptors and votes for their photos with the LNBNN
weight of HotSpotter (Crall et al. 2013): the distance to the (K+1)-th neighbour minus the distance
to the neighbour, so a descriptor that is distinctive (far from the crowd) weighs more. A photo's
score is the sum of its votes, one per query descriptor (the best). Where train-verifier fitted a
model of which inliers tell animals apart (keypoints.inlier_weights) and the engine weighs votes
(`Engine.vote_weights`: the calibration's setting, on for a calibration made since), each vote is further weighted
by that model's probability for the correspondence (query descriptor and position, the neighbour's
descriptor and position), squared (`VoteConfig.weight_power`): a head, horns, legs or the bushes behind
match across animals as well as the coat pattern does, and vote as loudly without it (on the
development set the right animal is the most voted photo for 20-24 of 144 known queries plainly, for
47-50 weighted). The photos with the most votes
join the shortlist and take every other one of the verifications: the trained embedding misses the right
animal for about a third of the development set's queries, and votes find a part of those.

A query meets only the gallery photos it is allowed (its viewpoint, a calibration fold's subset,
never its own photo), through a faiss ID selector inside the search, so that a hidden photo neither
takes a neighbour's place nor lowers the normaliser. The index is flat (exact) up to `exact_max`
descriptors, IVF-Flat above, on the CPU (ID selectors are a CPU feature of faiss). The built index
is saved in the run's cache (`cache/votes/`), keyed by the gallery's photos and the settings, and
rebuilt only when either changes (after `enroll`, say).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from core.stage import ALL, PairBatch, StageContext, StageOutput
from keypoints.features import DESC_DIM
from keypoints.inlier_weights import relative_xy, rows_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoteConfig:
    # strongest descriptors of each photo (gallery and query) that vote. 2000 (with nprobe 4, the same
    # search time) lifted the shortlist's recall on one development seed and lowered it on the other
    per_photo: int = 1000
    k: int = 5  # neighbours voted for per query descriptor; the (k+1)-th is the normaliser
    nprobe: int = 8  # IVF lists searched per descriptor
    lists: float = 4.0  # IVF lists: this many times the square root of the descriptor count
    exact_max: int = 50_000  # descriptors; up to this many an exact (flat) index
    seed: int = 0
    # each vote times (the inlier model's probability of the correspondence) ** this, where weighted
    # (Engine.vote_weights): 2 found the right animal among the 20 most voted photos for 101 / 101 of the
    # development set's 144 known queries (seeds 0 / 1), 1 for 96 / 99, unweighted 84 / 90
    weight_power: float = 2.0


_TRAIN_PER_LIST = 40  # k-means training points per IVF list


class VoteIndex:
    """Gallery descriptors (rows of `desc`, photo `owner[i]`, position `xy[i]` as a share of the
    photo's width and height: `relative_xy`), searchable with LNBNN votes."""

    def __init__(self, desc: np.ndarray, owner: np.ndarray, n_photos: int, cfg: VoteConfig = VoteConfig(),
                 index=None, xy: np.ndarray | None = None):
        self.cfg, self.owner, self.n_photos = cfg, np.asarray(owner, np.int64), int(n_photos)
        self.counts = np.bincount(self.owner, minlength=self.n_photos)
        if index is None:
            index = _build(np.ascontiguousarray(desc, np.float32), cfg)
        self.index = index
        # positions, for votes weighted by the model of inliers (None: unweighted votes only)
        self.xy = None if xy is None else np.asarray(xy, np.float32).reshape(-1, 2)
        self._direct_map = False

    @classmethod
    def from_store(cls, records: Sequence, get_keypoints: Callable[[Sequence], list], cfg: VoteConfig = VoteConfig(),
                   folder: Path | None = None, fingerprint: str = "") -> "VoteIndex":
        """The index over `records` (the gallery), their keypoints read by `get_keypoints(records) ->
        [Keypoints per record]` in chunks; loaded from `folder` when saved there with the same
        fingerprint (the records' cache keys, `fingerprint` and cfg). A record whose keypoints
        are missing for now (None: a photo not found, a read error that may pass) has no votes in
        this process, and the index is not saved, so that a later command builds it whole. An index
        saved without its positions (by an engine before weighted votes) is built again."""
        # (the weighting's power scores votes, it does not shape the index)
        shape = {k: v for k, v in asdict(cfg).items() if k != "weight_power"}
        tag = hashlib.sha1(json.dumps([fingerprint, shape, [r.key or str(r.path) for r in records]])
                           .encode()).hexdigest()[:16]
        path = folder / f"votes-{tag}.faiss" if folder is not None else None
        if path is not None and all(f.is_file() for f in (path, path.with_suffix(".owner.npy"),
                                                            path.with_suffix(".xy.npy"))):
            try:
                owner, xy = np.load(path.with_suffix(".owner.npy")), np.load(path.with_suffix(".xy.npy"))
                index = faiss.read_index(str(path))
                if not len(owner) == len(xy) == index.ntotal:
                    raise ValueError(f"{index.ntotal} descriptors, {len(owner)} owners, {len(xy)} positions")
                return cls(None, owner, len(records), cfg, index=index, xy=xy)
            except (OSError, RuntimeError, ValueError) as e:  # unreadable: build again
                log.warning("keypoint vote index %s unreadable (%s): building it again", path, e)
        descs, owner, xys, missing = [], [], [], 0
        for start in range(0, len(records), 128):
            for i, kp in enumerate(get_keypoints(records[start:start + 128]), start):
                missing += kp is None
                if kp is not None and len(kp):
                    kp = kp.top(cfg.per_photo)
                    descs.append(np.asarray(kp.desc, np.float32))
                    xys.append(relative_xy(kp))
                    owner.append(np.full(len(kp), i, np.int64))
        if not descs:
            descs, owner, xys = [np.zeros((0, DESC_DIM), np.float32)], [np.zeros(0, np.int64)], [np.zeros((0, 2))]
        t0 = time.perf_counter()
        vi = cls(np.concatenate(descs), np.concatenate(owner), len(records), cfg, xy=np.concatenate(xys))
        log.info("keypoint vote index: %d descriptors of %d photos, built in %.0f s", len(vi.owner), len(records),
                 time.perf_counter() - t0)
        if path is not None and missing:
            log.warning("keypoint vote index: %d gallery photos have no keypoints for now; the index is not "
                        "saved (built again next time)", missing)
        elif path is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("votes-*"):  # one index per run: the gallery's current one
                if not old.name.startswith(path.stem) and not old.name.endswith(".tmp"):
                    old.unlink(missing_ok=True)
            # under names of this process, then renamed: the owners and positions first, the index (what
            # a reader looks for) last, so that a reader never meets half a set
            tmp = folder / f"{path.stem}.{os.getpid()}.tmp"
            for suffix, array in ((".owner.npy", vi.owner), (".xy.npy", vi.xy)):
                np.save(tmp, array, allow_pickle=False)
                Path(f"{tmp}.npy").replace(path.with_suffix(suffix))
            faiss.write_index(vi.index, str(tmp))
            tmp.replace(path)
        return vi

    def votes(self, query_desc: np.ndarray, allowed: np.ndarray, query_xy: np.ndarray | None = None,
              weights=None) -> np.ndarray:
        """(n_photos,) summed LNBNN votes of one query's descriptors for the `allowed` photos (bool
        mask over the gallery); 0 for the others. With `weights` (a model of inliers, rows of
        keypoints.inlier_weights.rows_from -> probabilities) and the query descriptors' positions
        `query_xy` (`relative_xy`), each vote is weighted by the model's probability of its
        correspondence to the power `cfg.weight_power`; the index must hold its positions."""
        out = np.zeros(self.n_photos, np.float64)
        q = np.ascontiguousarray(np.asarray(query_desc, np.float32)[: self.cfg.per_photo])
        k = self.cfg.k
        if not len(q) or int(self.counts[allowed].sum()) <= k:
            return out
        bits = np.packbits(np.asarray(allowed, bool)[self.owner], bitorder="little")  # bit i: descriptor i
        sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # (its size in bytes)
        params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.cfg.nprobe) if isinstance(self.index, faiss.IndexIVF)
                  else faiss.SearchParameters(sel=sel))
        D, I = self.index.search(q, k + 1, params=params)
        ok = I[:, k] >= 0  # a descriptor whose probed lists held fewer than k+1 allowed neighbours: no vote
        if not ok.any():
            return out
        D, I = np.sqrt(np.maximum(D[ok], 0)), I[ok]
        w = np.maximum(D[:, k:] - D[:, :k], 0).ravel()
        photo = self.owner[I[:, :k]].ravel()
        row = np.repeat(np.arange(len(I)), k)
        if weights is not None:
            w = w * self.correspondence_weights(q[ok], np.asarray(query_xy, np.float32)[: len(q)][ok],
                                                I[:, :k], weights) ** self.cfg.weight_power
        # one vote per (query descriptor, photo): its best neighbour there
        order = np.lexsort((-w, photo, row))
        first = np.ones(len(order), bool)
        first[1:] = (row[order][1:] != row[order][:-1]) | (photo[order][1:] != photo[order][:-1])
        pick = order[first]
        out += np.bincount(photo[pick], weights=w[pick], minlength=self.n_photos)
        return out

    def correspondence_weights(self, q: np.ndarray, q_xy: np.ndarray, neighbours: np.ndarray, weights) -> np.ndarray:
        """The model's probability of each (query descriptor i, its neighbour `neighbours[i, j]`), in
        row order: the neighbours' descriptors read back from the index, their positions from `xy`."""
        if self.xy is None:
            raise ValueError("this vote index holds no keypoint positions: build it again to weight its votes")
        if isinstance(self.index, faiss.IndexIVF) and not self._direct_map:
            self.index.make_direct_map()  # reconstructing a descriptor of an IVF list needs it (8 B each)
            self._direct_map = True
        nb = neighbours.ravel()
        k = neighbours.shape[1]
        rows = rows_from(np.repeat(q, k, axis=0), self.index.reconstruct_batch(nb), np.repeat(q_xy, k, axis=0),
                         self.xy[nb])
        return weights.predict(rows)


def _build(desc: np.ndarray, cfg: VoteConfig):
    n, d = desc.shape
    if n <= cfg.exact_max:
        index = faiss.IndexFlatL2(d)
        index.add(desc)
        return index
    nlist = int(max(1, min(cfg.lists * np.sqrt(n), n // _TRAIN_PER_LIST)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.seed = cfg.seed
    rng = np.random.default_rng(cfg.seed)
    index.train(desc[np.sort(rng.choice(n, min(n, nlist * _TRAIN_PER_LIST), replace=False))])
    index.add(desc)
    index.nprobe = cfg.nprobe
    return index


class VoteStage:
    """The keypoint votes of each shortlisted photo (counted while shortlisting: `Engine.add_votes`)
    as a score, log(1 + votes): LNBNN's own ranking, calibrated and fused like the other stages.
    NaN where votes were not counted (`--votes 0`): the fusion then treats the stage as not run."""
    name = "votes"
    scope = ALL
    default_tau = 0.0  # uncalibrated, any vote is evidence: new_individual only where none was counted

    @classmethod
    def load(cls, ctx: StageContext) -> "VoteStage | None":
        # the votes are the SIFT stage's descriptors: a run has them once train-verifier has fitted it
        return cls() if ctx.run.verifier_path.is_file() else None

    @staticmethod
    def active(settings: dict) -> bool:
        """Votes are counted only with --votes > 0 (and where the run can count them)."""
        return settings.get("votes", 0) > 0

    def config(self) -> dict:
        return asdict(VoteConfig())

    def score(self, batch: PairBatch, gallery, progress: bool = False) -> StageOutput:
        votes = np.full(len(batch), np.nan) if batch.votes is None else np.asarray(batch.votes, np.float64)
        return StageOutput(np.log1p(votes))
