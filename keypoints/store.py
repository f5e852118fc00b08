"""Keypoints of catalog photos through the run folder's HDF5 cache (cache/keypoints/, float16 descriptors).

Extraction runs on a thread pool (SIFT releases the GIL); what is cached is never recomputed.
The cache fingerprint is the extraction config, so changing a setting starts a fresh cache.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import cv2
from tqdm.auto import tqdm

from core.cache import FeatureCache, record_key
from core.catalog import Record
from core.errors import ImageError
from core.executor import current_executor
from core.images import load_image_reduced
from keypoints.features import Keypoints, config_to_dict, extract_keypoints

log = logging.getLogger(__name__)


def decode_side(cfg) -> int | None:
    """How small a large photo may be decoded for an extraction with `cfg`: its working size."""
    return getattr(cfg, "max_side", None)


def extract_arrays(rec: Record, extract, min_side: int | None = None) -> tuple[dict | None, str, bool]:
    """(arrays as the cache stores them, "", False), or (None, reason, permanent) for an unreadable
    photo. Kept as the cache will give them back next time (float16 descriptors), so that a first
    run and a rerun score the same. With `min_side` (`decode_side`), a large JPEG is decoded
    reduced (core.images.load_image_reduced) and the positions placed in the full photo."""
    try:
        image, reduction = load_image_reduced(rec.path, rec.bbox, min_side)
        return extract(image).in_photo(reduction).to_arrays("float16"), "", False
    except ImageError as e:
        return None, str(e), e.permanent


REMOTE_PHOTOS = 32  # photos per Ray task


def extract_chunk(records: Sequence[Record], extract, min_side: int | None = None) -> list:
    """A Ray task: extract_arrays of each photo."""
    from core.executor import kill_once_hook

    kill_once_hook()
    cv2.setNumThreads(1)
    return [extract_arrays(rec, extract, min_side) for rec in records]


class KeypointStore:
    """`extract(image) -> Keypoints` (default: SIFT/RootSIFT with `cfg`) through the cache, whose
    fingerprint is `name` and the settings."""

    def __init__(self, cache_path: Path, cfg, extract=None, name: str = "keypoints"):
        if extract is None and getattr(cfg, "focus_keep", 1.0) < 1:
            cfg = replace(cfg, focus_keep=1.0)  # no focus map given: the whole photo, and the fingerprint says so
        self.cfg = cfg
        self.extract = extract or (lambda image: extract_keypoints(image, cfg))
        self.cache = FeatureCache(cache_path, f"{name}:" + json.dumps(config_to_dict(cfg), sort_keys=True))

    @property
    def min_side(self) -> int | None:
        return decode_side(self.cfg)

    def get(self, records: Sequence[Record], workers: int = 2, progress: bool = True,
            desc: str = "keypoints") -> dict[str, Keypoints]:
        """Keypoints by record key; an unreadable photo gets none (and is logged once)."""
        keys = {record_key(r): r for r in records}
        keys.pop(None, None)
        out = {k: Keypoints.from_arrays(v) for k, v in self.cache.get(keys).items()}
        known_bad = self.cache.unreadable()  # not retried, not warned again
        todo = [(k, r) for k, r in keys.items() if k not in out and k not in known_bad]
        if todo:
            out.update(self._fill(todo, workers, progress, desc))
        return out

    def _fill(self, todo: list[tuple[str, Record]], workers: int, progress: bool, desc: str) -> dict[str, Keypoints]:
        """The keypoints of photos not in the cache (key, record), extracted and cached; unreadable
        ones are recorded as such."""
        out: dict[str, Keypoints] = {}
        failed: dict[str, str] = {}
        executor = current_executor()

        def extracted(pool):
            """(key, (arrays, message, permanent)) per photo to do, in order: in the thread pool, or
            under Ray as chunks of photos (the results cached here)."""
            if not executor.remote:
                yield from zip((k for k, _ in todo),
                               pool.map(lambda item: extract_arrays(item[1], self.extract, self.min_side), todo))
                return
            chunks = [todo[i:i + REMOTE_PHOTOS] for i in range(0, len(todo), REMOTE_PHOTOS)]
            results = executor.map(extract_chunk, [[rec for _, rec in part] for part in chunks], self.extract,
                                   self.min_side)
            for part, res in zip(chunks, results):
                yield from zip((k for k, _ in part), res)

        before = cv2.getNumThreads()
        cv2.setNumThreads(1)  # one image per thread instead: the pools would fight otherwise
        new = {}
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for key, (arrays, message, permanent) in tqdm(extracted(pool), total=len(todo), desc=desc,
                                                              unit="img", disable=not progress, leave=False):
                    if arrays is None:
                        log.warning("no keypoints: %s", message)
                        if permanent:
                            failed[key] = message
                    else:
                        new[key] = arrays
                        out[key] = Keypoints.from_arrays(arrays)
                    if len(new) >= 512:  # bounded loss if killed mid-way
                        self.cache.add(new)
                        new = {}
        finally:
            cv2.setNumThreads(before)
        self.cache.add(new)
        self.cache.add_unreadable(failed)
        return out


class WhitenedStore(KeypointStore):
    """Keypoints of `source` with descriptors whitened (keypoints.whitening), cached as such: a photo
    is extracted (or read from the source's cache) once, whitened once."""

    def __init__(self, cache_path: Path, source: KeypointStore, whitening, name: str = "keypoints"):
        self.cfg, self.source, self.whitening = source.cfg, source, whitening
        self.extract = whitening.extractor(source.extract)  # what a Ray task extracts with
        self.cache = FeatureCache(cache_path, f"{name}+whitening:{whitening.fingerprint}:"
                                  + json.dumps(config_to_dict(source.cfg), sort_keys=True))

    def _fill(self, todo: list[tuple[str, Record]], workers: int, progress: bool, desc: str) -> dict[str, Keypoints]:
        """From the source (its cache, or extracted there), whitened and cached; the source's
        unreadable photos are recorded here too (the vote index reads them from this cache)."""
        raw = self.source.get([r for _, r in todo], workers, progress, desc)
        # as the cache gives them back (float16), so that a first run and a rerun score the same
        new = {k: self.whitening.keypoints(kp).to_arrays("float16") for k, kp in raw.items()}
        self.cache.add(new)
        source_bad = self.source.cache.unreadable()
        self.cache.add_unreadable({k: source_bad[k] for k, _ in todo if k in source_bad})
        return {k: Keypoints.from_arrays(a) for k, a in new.items()}


def verify_record_pairs(store: KeypointStore, pairs: Sequence[tuple[Record, Record]], cfg, workers: int = 2,
                        progress: bool = True, chunk: int = 128, pair_fn=None) -> list:
    """Keypoint-verify (query record, gallery record) pairs, `chunk` pairs at a time: the keypoints
    of one chunk are read (or extracted) through the cache, verified, and let go, so memory does
    not grow with the number of pairs. A photo without keypoints (unreadable) scores as an empty
    one: low, never an error. Results in the order of `pairs`."""
    from keypoints.verify import verify_pairs

    empty = Keypoints.empty((1, 1))
    results = []
    with tqdm(total=len(pairs), desc="verifying", unit="pair", disable=not progress, leave=False) as bar:
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            unique = {}
            for rec in (r for pair in part for r in pair):
                unique.setdefault(record_key(rec), rec)
            unique.pop(None, None)
            kps = store.get(list(unique.values()), workers, progress=False)
            keyed = [(record_key(q), record_key(g)) for q, g in part]
            results += verify_pairs(keyed, {k: kps.get(k, empty) for pair in keyed for k in pair}, cfg, workers,
                                    **({"pair_fn": pair_fn} if pair_fn else {}))
            bar.update(len(part))
    return results
