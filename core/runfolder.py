"""The run folder: everything one trained engine needs, so it can be copied to another machine.

  config.json       resolved settings, package versions, seed, format version
  siamese.pt        backbone + pair head weights
  gallery.h5        gallery embeddings (matrix in gallery order) with image paths, IDs, viewpoints
  embedding_whitening.npz  the embedding's whitening for search (siamese.index), when fitted
  heldout.json      individuals held out of Siamese training (calibration data)
  verifier.json     XGBoost validator            calibration.json  calibrators, fusion, tau
  metrics.json      figures of the last train/evaluate
  cache/            per-image HDF5 caches (embeddings, keypoints), reused across runs
Every file is written to a temporary name and renamed, so a killed command never leaves half a file.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from core.errors import UserError

FORMAT_VERSION = 1
_PACKAGES = ("torch", "timm", "faiss-cpu", "faiss-gpu", "opencv-contrib-python-headless", "xgboost",
             "xgboost-cpu", "numpy", "lap", "h5py")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without
    error, removed otherwise. Readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there if the write or the rename failed


def check_writable(path: Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that is a folder or cannot be written (naming it)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: give a file name")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{option} {path} cannot be written: {existing} is a file, not a folder")
    created = [p for p in path.parents if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + f".probe{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{option} {path} cannot be written ({e.strerror or e})") from None
    finally:  # the folders come back with the file; a command that fails before then leaves none behind
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


# what writes a run folder's JSON file anew, named when the file cannot be read (calibrate and
# train-verifier set an unreadable calibration aside: `Engine.load(..., replaces_calibration=True)`)
WRITTEN_BY = {"config.json": "`cli.py train-siamese ... --overwrite` (a new training)",
              "heldout.json": "`cli.py train-siamese ... --overwrite` (a new training)",
              "calibration.json": "`cli.py calibrate`"}


def read_json(path: Path) -> Any:
    cmd = WRITTEN_BY.get(Path(path).name)
    again = f"; {cmd} writes it anew" if cmd else ""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}){again}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): not a file this engine wrote{again}") from None


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    weights_path = property(lambda self: self.path / "siamese.pt")
    gallery_path = property(lambda self: self.path / "gallery.h5")
    heldout_path = property(lambda self: self.path / "heldout.json")
    embedding_whitening_path = property(lambda self: self.path / "embedding_whitening.npz")
    verifier_path = property(lambda self: self.path / "verifier.json")
    calibration_path = property(lambda self: self.path / "calibration.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    enrolled_path = property(lambda self: self.path / "enrolled.csv")  # the catalog rows `enroll` added
    cache_dir = property(lambda self: self.path / "cache")

    def create(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        full = {"format_version": FORMAT_VERSION, "versions": package_versions(), **config}
        atomic_write_json(self.config_path, full)

    def config(self) -> dict:
        """Read config.json, refusing run folders this engine cannot read."""
        if self.path.is_file():
            raise UserError(f"run folder {self.path} is a file: give the folder that holds it"
                            f"{f' ({self.path.parent})' if self.path.name == 'config.json' else ''}")
        if not self.path.is_dir():
            raise UserError(f"run folder {self.path} does not exist (make one with `cli.py train-siamese`)")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not a run folder: no config.json (make one with `cli.py train-siamese`)")
        cfg = read_json(self.config_path)
        version = cfg.get("format_version") if isinstance(cfg, dict) else None
        if version != FORMAT_VERSION:
            raise UserError(f"run folder {self.path} has format version {version}, this engine reads version "
                            f"{FORMAT_VERSION}: rebuild it with `cli.py train-siamese`")
        return cfg

    def update_config(self, **entries) -> dict:
        cfg = self.config()
        cfg.update(entries)
        atomic_write_json(self.config_path, cfg)
        return cfg

    def images_root(self) -> Path | None:
        """Where the gallery's relative photo paths start: the folder recorded at train-siamese if it
        still exists, else the same folder found by its position relative to the run folder (both
        moved together), else the recorded one (photos gone: cached features are read by key)."""
        cfg = self.config()
        recorded, from_run = cfg.get("images_root"), cfg.get("images_root_from_run")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
        if from_run is not None and (self.path / from_run).is_dir():
            return (self.path / from_run).resolve()
        return Path(recorded) if recorded else None

    def heldout(self) -> set[str]:
        """Individuals kept out of Siamese training (and of verifier training)."""
        return set(read_json(self.heldout_path)["individuals"]) if self.heldout_path.is_file() else set()

    def calibration_individuals(self) -> set[str]:
        """The held-out individuals calibrate may use: those that did not pick the training epoch
        (all held-out ones for a run folder written before the split was recorded)."""
        if not self.heldout_path.is_file():
            return set()
        doc = read_json(self.heldout_path)
        return set(doc.get("calibration", doc["individuals"]))

    def update_metrics(self, section: str, values: dict) -> None:
        metrics = read_json(self.metrics_path) if self.metrics_path.exists() else {}
        metrics[section] = values
        atomic_write_json(self.metrics_path, metrics)
