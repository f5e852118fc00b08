"""Images -> L2-normalised embeddings, through the per-image HDF5 cache.

Decoding runs in a thread pool one batch ahead of the network, which runs in the precision and
memory format chosen for this machine (`siamese.precision`).
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from core.cache import FeatureCache, record_key
from core.catalog import Record
from core.errors import ImageError
from core.images import load_image
from siamese.focus import focus_crop
from siamese.model import ModelConfig, SiameseNet, decode_side, preprocess

log = logging.getLogger(__name__)


_NAMED_UNREADABLE: set = set()  # cache keys of unreadable photos this process has warned about


def model_fingerprint(model: SiameseNet) -> str:
    """Identifies the feature function: settings, precision and backbone + pooling weights (not the
    centre, which is applied after the cache)."""
    settings = model.config.to_dict()
    if tuple(settings["views"]) == ("box",):  # as before views existed: older caches stay valid
        del settings["views"]
    h = hashlib.sha1(repr(sorted(settings.items())).encode())
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
    known_unreadable: int = 0  # of `skipped`: found unreadable by an earlier command (not tried again)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def load_for_model(rec: Record, cfg: ModelConfig) -> np.ndarray:
    """The photo as the network sees it (its "box" view): the record's bbox if the catalog gives one,
    else with `crop="focus"` the box around the animal (siamese.focus), else the whole photo; a large
    JPEG decoded reduced (siamese.model.decode_side)."""
    return load_views(rec, replace(cfg, views=("box",)))[0]


def load_views(rec: Record, cfg: ModelConfig) -> list[np.ndarray]:
    """The photo's `ModelConfig.views`, in that order: "box" (load_for_model), "centre" (the middle
    80% of the box per side), "photo" (the whole decoded photo, or the catalog's bbox). A view that
    is the same image as an earlier one is left out, so that it counts once: "photo" and "box" are
    one image with a catalog bbox, with crop="none" or where the focus box keeps the whole photo."""
    photo = load_image(rec.path, rec.bbox, min_side=decode_side(cfg.input_size))
    box = photo
    if cfg.crop == "focus" and rec.bbox is None and any(v in ("box", "centre") for v in cfg.views):
        box = focus_crop(photo)
        box = photo if box.shape == photo.shape else box
    out: list[np.ndarray] = []
    for view in cfg.views:
        image = box if view == "box" else photo
        if view == "centre":
            h, w = box.shape[:2]
            dy, dx = int(round(0.1 * h)), int(round(0.1 * w))
            image = box[dy:h - dy, dx:w - dx] if h - 2 * dy > 0 and w - 2 * dx > 0 else box
        if not any(image is seen for seen in out):
            out.append(image)
    return out


def _load(rec: Record, cfg: ModelConfig):
    """(views x 3 x h x w network input, None), or (None, the ImageError)."""
    try:
        return np.stack([preprocess(v, cfg) for v in load_views(rec, cfg)]), None
    except ImageError as e:
        return None, e


@torch.no_grad()
def features_batch(model: SiameseNet, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Raw pooled features (with `ModelConfig.mirror`, the mean of the photo's and its mirror image's).
    A short batch is padded to batch_size: on CPU every new input shape
    costs seconds of kernel re-compilation, more than the padding."""
    device = next(model.parameters()).device
    n = len(batch)
    if n < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    x = torch.from_numpy(batch).to(device)
    with model.precision.autocast(device.type):
        f = model.features(model.prepare_input(x)).float()
        if model.config.mirror:  # ModelConfig.mirror: the mean with the mirror image's features
            f = (f + model.features(model.prepare_input(torch.flip(x, dims=[-1]))).float()) / 2
    return f.cpu().numpy()[:n]


def normalize_features(model: SiameseNet, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.normalize(torch.from_numpy(feats).to(model.center.device)).cpu().numpy()


def _features_of(model: SiameseNet, loaded: list, batch_size: int) -> list[tuple[np.ndarray | None, str, bool]]:
    """(features, "", False) per decoded photo, (None, reason, permanent) per unreadable one."""
    good = [arr for arr, err in loaded if err is None]
    feats = iter(())
    if good:  # every view of every photo, batch_size images at a time; each photo's views averaged
        views = np.concatenate(good)
        f = np.concatenate([features_batch(model, views[i:i + batch_size], batch_size)
                            for i in range(0, len(views), batch_size)])
        feats = iter([part.mean(axis=0) for part in np.split(f, np.cumsum([len(a) for a in good])[:-1])])
    return [(next(feats), "", False) if err is None else (None, str(err), err.permanent) for _, err in loaded]


def _local_batches(model: SiameseNet, records: Sequence[Record], batches: list, workers: int, batch_size: int):
    """In this process: decoding in a thread pool one batch ahead of the network."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.map(lambda i: _load(records[i], model.config), batches[0])]
        for bi in range(len(batches)):
            loaded = list(pending.pop())
            if bi + 1 < len(batches):
                pending.append(pool.map(lambda i: _load(records[i], model.config), batches[bi + 1]))
            yield _features_of(model, loaded, batch_size)


def model_blob(model: SiameseNet) -> dict:
    """What a Ray worker needs to rebuild the network (sent once through the object store)."""
    return {"key": model_fingerprint(model), "config": model.config.to_dict(), "precision": model.precision.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


_WORKER_MODELS: dict[str, SiameseNet] = {}


def embed_chunk(records: Sequence[Record], blob: dict, batch_size: int, threads: int) -> list:
    """A Ray task: decode and embed one batch of photos with the network of `blob` (built once per
    worker process), on `threads` torch threads (the driver's count: the same bits)."""
    from core.executor import kill_once_hook
    from siamese.precision import Precision

    kill_once_hook()
    torch.set_num_threads(threads)
    model = _WORKER_MODELS.get(blob["key"])
    if model is None:
        model = SiameseNet(ModelConfig.from_dict(blob["config"]), load_pretrained=False)
        model.load_state_dict(blob["state_dict"])
        model.set_precision(Precision(**blob["precision"]))
        _WORKER_MODELS.clear()  # one network per worker at a time
        _WORKER_MODELS[blob["key"]] = model.eval()
    return _features_of(model, [_load(r, model.config) for r in records], batch_size)


def embed_records(model: SiameseNet, records: Sequence[Record], cache_path: Path | None = None,
                  batch_size: int = 32, workers: int = 2, progress: bool = True,
                  desc: str = "embedding", executor=None) -> EmbedResult:
    """Embed every record, reading what the cache has and adding what it lacks; with a remote
    executor (Ray) each batch is a task and the results are cached here.

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
    # named again, briefly, once per command: its user may not have seen the command that found them
    unnamed = [(r, m) for r, m in skipped if record_key(r) not in _NAMED_UNREADABLE]
    if unnamed:
        names = ", ".join(str(r.path) for r, _ in unnamed[:3]) + (f" and {len(unnamed) - 3} more" if len(unnamed) > 3
                                                                    else "")
        log.warning("skipped %d photo(s) found unreadable before (%s): %s", len(unnamed), unnamed[0][1], names)
        _NAMED_UNREADABLE.update(record_key(r) for r, _ in unnamed)
    known_unreadable = len(skipped)
    todo = [i for i, k in enumerate(keys) if i not in vectors and k not in known_bad]
    failed: dict[str, str] = {}
    new: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    if todo:
        model.set_precision(model.precision)  # the memory format it asks for
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False)
        if executor is None:
            from core.executor import current_executor

            executor = current_executor()
        if executor.remote:  # one task per batch: the same batches as here
            # as many torch threads as here: a convolution's sums, hence the last bits of the
            # embeddings, depend on how many threads share them
            threads = torch.get_num_threads()
            done = executor.map(embed_chunk, [[records[i] for i in b] for b in batches],
                                executor.put(model_blob(model)), batch_size, threads, cpus=threads)
        else:
            done = _local_batches(model, records, batches, workers, batch_size)
        for batch, out in zip(batches, done):
            for i, (f, message, permanent) in zip(batch, out):
                if f is None:
                    log.warning("skipped %s%s", message, records[i].line_note)
                    _NAMED_UNREADABLE.add(keys[i])
                    skipped.append((records[i], message))
                    if permanent and keys[i]:
                        failed[keys[i]] = message
                else:
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
    return EmbedResult(normalize_features(model, feats), ok, skipped, computed, seconds, feats, known_unreadable)
