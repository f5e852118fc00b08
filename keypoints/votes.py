"""Keypoint votes: a second source of candidates, beside the embedding's shortlist.

Every gallery photo's strongest RootSIFT descriptors go into one faiss index. Each descriptor of a
query photo looks up its K nearest gallery descriptors and votes for their photos with the LNBNN
weight of HotSpotter (Crall et al. 2013): the distance to the (K+1)-th neighbour minus the distance
to the neighbour, so a descriptor that is distinctive (far from the crowd) weighs more. A photo's
score is the sum of its votes, one per query descriptor (the best). The photos with the most votes
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


_TRAIN_PER_LIST = 40  # k-means training points per IVF list


class VoteIndex:
    """Gallery descriptors (rows of `desc`, photo `owner[i]`), searchable with LNBNN votes."""

    def __init__(self, desc: np.ndarray, owner: np.ndarray, n_photos: int, cfg: VoteConfig = VoteConfig(),
                 index=None):
        self.cfg, self.owner, self.n_photos = cfg, np.asarray(owner, np.int64), int(n_photos)
        self.counts = np.bincount(self.owner, minlength=self.n_photos)
        if index is None:
            index = _build(np.ascontiguousarray(desc, np.float32), cfg)
        self.index = index

    @classmethod
    def from_store(cls, records: Sequence, get_desc: Callable[[Sequence], list], cfg: VoteConfig = VoteConfig(),
                   folder: Path | None = None, fingerprint: str = "") -> "VoteIndex":
        """The index over `records` (the gallery), their descriptors read by `get_desc(records) ->
        [desc array per record]` in chunks; loaded from `folder` when saved there with the same
        fingerprint (the records' cache keys, `fingerprint` and cfg). A record whose descriptors
        are missing for now (None: a photo not found, a read error that may pass) has no votes in
        this process, and the index is not saved, so that a later command builds it whole."""
        tag = hashlib.sha1(json.dumps([fingerprint, asdict(cfg), [r.key or str(r.path) for r in records]])
                           .encode()).hexdigest()[:16]
        path = folder / f"votes-{tag}.faiss" if folder is not None else None
        if path is not None and path.is_file() and path.with_suffix(".owner.npy").is_file():
            try:
                return cls(None, np.load(path.with_suffix(".owner.npy")), len(records), cfg,
                           index=faiss.read_index(str(path)))
            except (OSError, RuntimeError, ValueError) as e:  # unreadable: build again
                log.warning("keypoint vote index %s unreadable (%s): building it again", path, e)
        descs, owner, missing = [], [], 0
        for start in range(0, len(records), 128):
            for i, d in enumerate(get_desc(records[start:start + 128]), start):
                missing += d is None
                if d is not None and len(d):
                    d = np.asarray(d[:cfg.per_photo], np.float32)
                    descs.append(d)
                    owner.append(np.full(len(d), i, np.int64))
        if not descs:
            descs, owner = [np.zeros((0, DESC_DIM), np.float32)], [np.zeros(0, np.int64)]
        t0 = time.perf_counter()
        vi = cls(np.concatenate(descs), np.concatenate(owner), len(records), cfg)
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
            # under names of this process, then renamed: the owners first, the index (what a reader
            # looks for) last, so that a reader never meets half a pair
            tmp = folder / f"{path.stem}.{os.getpid()}.tmp"
            np.save(tmp, vi.owner, allow_pickle=False)
            Path(f"{tmp}.npy").replace(path.with_suffix(".owner.npy"))
            faiss.write_index(vi.index, str(tmp))
            tmp.replace(path)
        return vi

    def votes(self, query_desc: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """(n_photos,) summed LNBNN votes of one query's descriptors for the `allowed` photos (bool
        mask over the gallery); 0 for the others."""
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
        # one vote per (query descriptor, photo): its best neighbour there
        order = np.lexsort((-w, photo, row))
        first = np.ones(len(order), bool)
        first[1:] = (row[order][1:] != row[order][:-1]) | (photo[order][1:] != photo[order][:-1])
        pick = order[first]
        out += np.bincount(photo[pick], weights=w[pick], minlength=self.n_photos)
        return out


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
