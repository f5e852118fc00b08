"""Per-image feature caches in HDF5 (embeddings, keypoints), filled incrementally.

As in hloc: one file, one group per image. The group name is a hash of the key
`resolved path|size|mtime_ns`, so an edited or replaced photo is recomputed. The file carries a
fingerprint of whatever produced the features (model weights, settings): a different fingerprint
means the cache is stale and is started afresh. New entries are written to a temporary copy
that replaces the file only when complete, so a killed run never leaves a broken cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np


def image_key(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def record_key(record) -> str | None:
    """Cache key of a catalog record (its photo, and its crop if any); None if the file is gone."""
    try:
        key = image_key(record.path)
    except OSError:
        return None
    return key + (f"|bbox={record.bbox}" if record.bbox else "")


def _group_name(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


class FeatureCache:
    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def _valid(self, f: h5py.File) -> bool:
        return f.attrs.get("fingerprint", "") == self.fingerprint

    def keys(self) -> set[str]:
        if not self.path.exists():
            return set()
        with h5py.File(self.path, "r") as f:
            if not self._valid(f):
                return set()
            return {f[g].attrs["key"] for g in f}

    def get(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """The entries present for `keys` (missing or stale ones are simply absent)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        if not self.path.exists():
            return out
        with h5py.File(self.path, "r") as f:
            if not self._valid(f):
                return out
            for key in keys:
                g = f.get(_group_name(key))
                if g is not None:
                    out[key] = {name: g[name][()] for name in g}
        return out

    def add(self, items: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        fresh = True
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                fresh = not self._valid(f)
            if not fresh:
                shutil.copyfile(self.path, tmp)
        try:
            with h5py.File(tmp, "w" if fresh else "a") as f:
                f.attrs["fingerprint"] = self.fingerprint
                for key, arrays in items.items():
                    name = _group_name(key)
                    if name in f:
                        del f[name]
                    g = f.create_group(name)
                    g.attrs["key"] = key
                    for aname, arr in arrays.items():
                        g.create_dataset(aname, data=np.asarray(arr))
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
