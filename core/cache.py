"""Per-image feature caches in HDF5 (embeddings, keypoints), filled incrementally.

As in hloc, one group per image, but spread over shard files in a folder (`cache/embeddings/`,
`cache/keypoints/`): each batch of new entries becomes a new shard, written under a temporary name
and renamed when complete. A killed run loses at most the shard in progress, and adding never
rewrites what exists. A lookup opens every shard, so once more than MAX_SHARDS pile up (every
`match` adds one) the smallest are merged into one: an entry is rewritten only a few times over the
cache's life, and lookups stay fast.
The group name is a hash of the key `resolved path|size|mtime_ns`, so an edited or replaced photo
is recomputed. Every shard carries a fingerprint of what produced the features (model weights,
settings, precision), also as a tag in its file name: shards of another fingerprint are stale,
ignored, and removed at the next write. A shard that cannot be read (a transient I/O error, a disk
that filled up) is skipped, never deleted. Photos that could not be decoded are remembered in
`unreadable.json` (by key, so a replaced file is tried again) and not retried on every call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from core.runfolder import atomic_write_json

log = logging.getLogger(__name__)


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


MAX_SHARDS = 16


def _tag(fingerprint: str) -> str:
    return hashlib.sha1(fingerprint.encode("utf-8")).hexdigest()[:12]


class FeatureCache:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.tag = _tag(fingerprint)

    @property
    def unreadable_path(self) -> Path:
        return self.folder / "unreadable.json"

    def _fingerprint_of(self, path: Path) -> str | None:
        """The shard's fingerprint tag, from its name (`shard-TAG-TIME-PID.h5`) or, for shards named
        before tags, from the file; None if it cannot be read."""
        parts = path.stem.split("-")
        if len(parts) == 4:
            return parts[1]
        try:
            with h5py.File(path, "r") as f:
                return _tag(str(f.attrs.get("fingerprint", "")))
        except OSError:
            return None

    def _shards(self) -> tuple[list[Path], list[Path]]:
        """(valid shards, stale shards), oldest first. Unreadable shards are in neither."""
        if not self.folder.is_dir():
            return [], []
        valid, stale = [], []
        for p in sorted(self.folder.glob("shard-*.h5")):
            tag = self._fingerprint_of(p)
            if tag is None:
                log.warning("cache shard %s cannot be read: skipped (its entries are recomputed)", p)
            else:
                (valid if tag == self.tag else stale).append(p)
        return valid, stale

    def _open(self, path: Path):
        try:
            return h5py.File(path, "r")
        except OSError as e:
            log.warning("cache shard %s cannot be read (%s): skipped", path, e)
            return None

    def keys(self) -> set[str]:
        out = set()
        for p in self._shards()[0]:
            f = self._open(p)
            if f is not None:
                with f:
                    out |= {f[g].attrs["key"] for g in f}
        return out

    def get(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """The entries present for `keys` (missing, stale or unreadable ones are simply absent)."""
        wanted = {_group_name(k): k for k in keys}
        out: dict[str, dict[str, np.ndarray]] = {}
        for p in reversed(self._shards()[0]):  # newest first
            if len(out) == len(wanted):
                break
            f = self._open(p)
            if f is None:
                continue
            with f:
                for name, key in wanted.items():
                    if key not in out and name in f:
                        g = f[name]
                        out[key] = {a: g[a][()] for a in g}
        return out

    def add(self, items: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        if not items:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self._shards()[1]:
            p.unlink(missing_ok=True)

        def write(f):
            for key, arrays in items.items():
                g = f.create_group(_group_name(key))
                g.attrs["key"] = key
                for aname, arr in arrays.items():
                    g.create_dataset(aname, data=np.asarray(arr))

        self.write_shard(write)
        self.compact()

    def write_shard(self, fill) -> Path:
        """A new shard, filled by `fill(h5py.File)`, complete on disk before it is visible."""
        final = self.folder / f"shard-{self.tag}-{time.time_ns():020d}-{os.getpid()}.h5"
        tmp = final.with_suffix(".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["fingerprint"] = self.fingerprint
                fill(f)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def compact(self, max_shards: int = MAX_SHARDS) -> int:
        """Past `max_shards` valid shards, merge the smallest into one so that half as many remain.
        The merged shard is complete on disk before its sources are removed. Returns how many
        shards were merged (0: nothing to do)."""
        valid = self._shards()[0]
        if len(valid) <= max_shards:
            return 0
        smallest = sorted(valid, key=lambda p: p.stat().st_size)[: len(valid) - max_shards // 2 + 1]
        # newest first (names carry the time they were written): a key written again keeps its latest
        # entry, as `get` reads it, and none that a newer shard left as it is holds again
        sources = [(p, f) for p in sorted(smallest, key=lambda p: p.name, reverse=True)
                   if (f := self._open(p)) is not None]
        newer_kept: dict[str, set[str]] = {}  # per source: keys of the unmerged shards written after it
        for p in (p for p in valid if p not in smallest):
            f = self._open(p)
            if f is not None:
                with f:
                    names = set(f)
                for src, _ in sources:
                    if p.name > src.name:
                        newer_kept.setdefault(src.name, set()).update(names)

        def merge(out):
            for p, src in sources:
                skip = newer_kept.get(p.name, set())
                for name in src:
                    if name not in out and name not in skip:
                        src.copy(src[name], out, name)

        try:
            self.write_shard(merge)
        finally:
            for _, src in sources:
                src.close()
        for p, _ in sources:
            p.unlink(missing_ok=True)
        return len(sources)

    # ------------------------------------------------------------ photos that cannot be decoded
    def unreadable(self) -> dict[str, str]:
        """key -> reason, for photos that failed to decode (permanently) with this key."""
        try:
            data = json.loads(self.unreadable_path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def add_unreadable(self, failures: Mapping[str, str]) -> None:
        if not failures:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.unreadable_path, {**self.unreadable(), **failures})
