"""Images -> L2-normalised embeddings, through the per-image HDF5 cache.

Decoding runs in a thread pool one batch ahead of the network, which runs in the precision and
memory format chosen for this machine (`siamese.precision`).
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from core.cache import FeatureCache, record_key
from core.catalog import Record
from core.errors import ImageError
from core.images import load_image
from siamese.model import ModelConfig, SiameseNet

log = logging.getLogger(__name__)


def preprocess(rgb: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HxWx3 uint8 -> 3xhxw float32 normalised, resized to the model's input size."""
    h, w = cfg.input_size
    interp = cv2.INTER_AREA if rgb.shape[0] > h or rgb.shape[1] > w else cv2.INTER_CUBIC
    x = cv2.resize(rgb, (w, h), interpolation=interp).astype(np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def model_fingerprint(model: SiameseNet) -> str:
    """Identifies the feature function: settings, precision and backbone + pooling weights (not the
    centre, which is applied after the cache)."""
    h = hashlib.sha1(repr(sorted(model.config.to_dict().items())).encode())
    h.update(model.precision.name.encode())
    for name, t in list(model.backbone.state_dict().items()) + [("gem_p", model.pool.p.detach())]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # (n_ok, D) float32, rows in the order of `ok`
    ok: np.ndarray  # indices into the input records that were embedded
    skipped: list[tuple[Record, str]] = field(default_factory=list)
    computed: int = 0  # how many were computed (not read from the cache)
    seconds: float = 0.0
    features: np.ndarray | None = None  # (n_ok, D) raw pooled features, before centring

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def _load(rec: Record, cfg: ModelConfig):
    try:
        return preprocess(load_image(rec.path, rec.bbox), cfg), None
    except ImageError as e:
        return None, e


@torch.no_grad()
def features_batch(model: SiameseNet, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Raw pooled features. A short batch is padded to batch_size: on CPU every new input shape
    costs seconds of kernel re-compilation, more than the padding."""
    device = next(model.parameters()).device
    n = len(batch)
    if n < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    x = model.prepare_input(torch.from_numpy(batch).to(device))
    with model.precision.autocast(device.type):
        f = model.features(x)
    return f.float().cpu().numpy()[:n]


def normalize_features(model: SiameseNet, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.normalize(torch.from_numpy(feats).to(model.center.device)).cpu().numpy()


def embed_records(model: SiameseNet, records: Sequence[Record], cache_path: Path | None = None,
                  batch_size: int = 32, workers: int = 2, progress: bool = True,
                  desc: str = "embedding") -> EmbedResult:
    """Embed every record, reading what the cache has and adding what it lacks.

    A photo that cannot be decoded is skipped with a warning naming it; the others go on.
    """
    model.eval()
    cache = FeatureCache(cache_path, model_fingerprint(model)) if cache_path else None
    keys = [record_key(r) for r in records]
    cached = cache.get([k for k in keys if k]) if cache else {}
    vectors: dict[int, np.ndarray] = {i: cached[k]["features"] for i, k in enumerate(keys) if k in cached}
    # photos already known to be undecodable (this very file: same size and mtime) are not retried
    known_bad = cache.unreadable() if cache else {}
    skipped: list[tuple[Record, str]] = [(records[i], known_bad[k]) for i, k in enumerate(keys)
                                         if k in known_bad and i not in vectors]
    if skipped:
        log.debug("%d photos known to be unreadable skipped, e.g. %s", len(skipped), skipped[0][1])
    todo = [i for i, k in enumerate(keys) if i not in vectors and k not in known_bad]
    failed: dict[str, str] = {}
    new: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    if todo:
        model.set_precision(model.precision)  # the memory format it asks for
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = [pool.map(lambda i: _load(records[i], model.config), batches[0])]
            for bi, batch in enumerate(batches):
                loaded = list(pending.pop())
                if bi + 1 < len(batches):
                    pending.append(pool.map(lambda i: _load(records[i], model.config), batches[bi + 1]))
                good = []
                for i, (arr, err) in zip(batch, loaded):
                    if err is not None:
                        log.warning("skipped %s", err)
                        skipped.append((records[i], str(err)))
                        if err.permanent and keys[i]:
                            failed[keys[i]] = str(err)
                    else:
                        good.append((i, arr))
                if good:
                    feats = features_batch(model, np.stack([a for _, a in good]), batch_size)
                    for (i, _), f in zip(good, feats):
                        vectors[i] = f
                        if keys[i]:
                            new[keys[i]] = {"features": f}
                bar.update(len(batch))
                if cache and len(new) >= 1024:  # bounded loss if killed mid-way
                    cache.add(new)
                    new = {}
        bar.close()
        if cache:
            cache.add(new)
            cache.add_unreadable(failed)
    seconds = time.perf_counter() - t0
    ok = np.array(sorted(vectors), dtype=np.int64)
    dim = model.dim
    feats = np.stack([vectors[i] for i in ok]).astype(np.float32) if len(ok) else np.zeros((0, dim), np.float32)
    computed = sum(1 for i in todo if i in vectors)
    return EmbedResult(normalize_features(model, feats), ok, skipped, computed, seconds, feats)
