"""The gallery of a run: its photos, their individual IDs and viewpoints, and their embeddings.

Stored in `gallery.h5` in gallery order so a run folder carries its gallery to another machine: the
paths of photos under the run's images root are stored relative to it (the root is recorded in
config.json), so the run folder finds its photos wherever the two are moved together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from core.cache import record_key
from core.catalog import Record
from core.errors import UserError
from core.runfolder import atomic_path

_STR = h5py.string_dtype("utf-8")


@dataclass
class Gallery:
    paths: list[str]  # resolved file paths
    ids: list[str]
    viewpoints: list[str]  # "" where unknown
    bboxes: np.ndarray  # (n, 4) int, -1 where none
    embeddings: np.ndarray  # (n, D) float32, L2-normalised
    keys: list[str] | None = None  # cache key of each photo when it was added ("" if unknown)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(cls, records: list[Record], embeddings: np.ndarray) -> "Gallery":
        return cls(paths=[str(Path(r.path).resolve()) for r in records],
                   ids=[str(r.individual_id) for r in records],
                   viewpoints=[r.viewpoint or "" for r in records],
                   bboxes=np.array([r.bbox or (-1, -1, -1, -1) for r in records], dtype=np.int64).reshape(-1, 4),
                   embeddings=np.asarray(embeddings, dtype=np.float32),
                   keys=[record_key(r) or "" for r in records])

    def record(self, i: int) -> Record:
        return Record(image=self.paths[i], path=Path(self.paths[i]), individual_id=self.ids[i],
                      viewpoint=self.viewpoints[i] or None, bbox=self.bbox(i), key=self.key(i))

    def bbox(self, i: int) -> tuple[int, int, int, int] | None:
        """The photo's catalog bbox (x, y, w, h), None for the whole photo."""
        return tuple(int(v) for v in self.bboxes[i]) if self.bboxes[i][0] >= 0 else None

    def key(self, i: int) -> str | None:
        return (self.keys[i] or None) if self.keys else None

    def records(self) -> list[Record]:
        return [self.record(i) for i in range(len(self))]

    def extend(self, other: "Gallery") -> "Gallery":
        return Gallery(self.paths + other.paths, self.ids + other.ids, self.viewpoints + other.viewpoints,
                       np.concatenate([self.bboxes, other.bboxes]),
                       np.concatenate([self.embeddings, other.embeddings]),
                       (self.keys or [""] * len(self)) + (other.keys or [""] * len(other)))

    def save(self, path: Path, root: Path | None = None) -> None:
        """Paths under `root` are written relative to it, the others absolute."""
        stored = [_relative(p, root) for p in self.paths]
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=self.embeddings)
            f.create_dataset("bboxes", data=self.bboxes)
            for name in ("paths", "ids", "viewpoints", "keys"):
                values = stored if name == "paths" else getattr(self, name)
                if values is not None:
                    f.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR)

    @classmethod
    def load(cls, path: Path, root: Path | None = None) -> "Gallery":
        """Relative paths are resolved against `root` (the run's images root)."""
        if not Path(path).is_file():
            raise UserError(f"{path} not found: the run folder has no gallery (run `cli.py train-siamese`)")
        def strings(f, name):
            return [s.decode() if isinstance(s, bytes) else s for s in f[name][()]] if name in f else None

        try:
            with h5py.File(path, "r") as f:
                paths = [p if root is None or Path(p).is_absolute() else str(Path(root) / p)
                         for p in strings(f, "paths")]
                return cls(paths=paths, ids=strings(f, "ids"), viewpoints=strings(f, "viewpoints"),
                           bboxes=f["bboxes"][()], embeddings=f["embeddings"][()], keys=strings(f, "keys"))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({e.__class__.__name__}: {e}): rebuild the run with "
                            f"`cli.py train-siamese --overwrite`") from None


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return Path(path).relative_to(Path(root)).as_posix()
    except ValueError:
        return path
