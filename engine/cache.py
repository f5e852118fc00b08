"""Per-image feature caches in HDF5 (embeddings, keypoints), filled incrementally.

As in hloc, one group per image, but spread over shard files in a folder (`cache/embeddings/`,
`cache/keypoints/`): each batch of new entries becomes a new shard, written under a temporary name
and renamed when complete. A killed run loses at most the shard in progress, and adding never
rewrites what exists (cost linear in what is added, whatever the cache's size).
The group name is a hash of the key `resolved path|size|mtime_ns`, so an edited or replaced photo
is recomputed. Every shard carries a fingerprint of what produced the features (model weights,
settings): shards with another fingerprint are stale, ignored, and removed at the next write.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np


def image_key(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def record_key(record) -> str | None:
    """Cache key of a catalog record (its photo, and its crop if any); None if the file is gone.
    A gallery record carries the key its photo had when it was added, so a run folder copied to
    another machine (without the photos, or with them elsewhere) still finds its cached features."""
    if record.key:
        return record.key
    try:
        key = image_key(record.path)
    except OSError:
        return None
    return key + (f"|bbox={record.bbox}" if record.bbox else "")


def _group_name(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


class FeatureCache:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def _shards(self) -> tuple[list[Path], list[Path]]:
        """(valid shards, stale shards), oldest first."""
        if not self.folder.is_dir():
            return [], []
        valid, stale = [], []
        for p in sorted(self.folder.glob("shard-*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    (valid if f.attrs.get("fingerprint", "") == self.fingerprint else stale).append(p)
            except OSError:  # unreadable (e.g. a disk filled up mid-write before the rename)
                stale.append(p)
        return valid, stale

    def keys(self) -> set[str]:
        out = set()
        for p in self._shards()[0]:
            with h5py.File(p, "r") as f:
                out |= {f[g].attrs["key"] for g in f}
        return out

    def get(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """The entries present for `keys` (missing or stale ones are simply absent)."""
        wanted = {_group_name(k): k for k in keys}
        out: dict[str, dict[str, np.ndarray]] = {}
        for p in reversed(self._shards()[0]):  # newest first: a re-added key wins
            if len(out) == len(wanted):
                break
            with h5py.File(p, "r") as f:
                for name in wanted.keys() & f.keys():
                    key = wanted[name]
                    if key not in out:
                        g = f[name]
                        out[key] = {a: g[a][()] for a in g}
        return out

    def add(self, items: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        if not items:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self._shards()[1]:
            p.unlink(missing_ok=True)
        final = self.folder / f"shard-{time.time_ns():020d}-{os.getpid()}.h5"
        tmp = final.with_suffix(".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["fingerprint"] = self.fingerprint
                for key, arrays in items.items():
                    g = f.create_group(_group_name(key))
                    g.attrs["key"] = key
                    for aname, arr in arrays.items():
                        g.create_dataset(aname, data=np.asarray(arr))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
