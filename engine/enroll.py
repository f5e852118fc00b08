"""The enroll command: add confirmed photos to the gallery (embeddings, local features, index)
without retraining."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from core.catalog import load_catalog
from core.errors import UserError
from core.gallery import Gallery
from core.runtime import set_threads
from engine.config import MatchConfig
from engine.matching import skipped_note
from engine.pipeline import Engine


@dataclass(frozen=True)
class Paths:
    catalog: Path  # confirmed photos (image,individual_id[,viewpoint])
    run: Path
    images: Path | None = None


def main(cfg: MatchConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> str:
    t0 = time.perf_counter()
    set_threads(threads)
    catalog = load_catalog(paths.catalog, paths.images)
    engine = Engine.load(paths.run, precision)
    present = set(engine.gallery.paths)
    records = [r for r in catalog.records if str(Path(r.path).resolve()) not in present]
    already = len(catalog.records) - len(records)
    if not records:
        return f"nothing to enroll: all {already} photos of {paths.catalog} are already in the gallery"
    emb = engine.embed(records, cfg, progress, "embedding new photos")
    if len(emb.ok) == 0:
        raise UserError(f"none of the {len(records)} photos could be read (first: {emb.skipped[0][1]})")
    added = [records[i] for i in emb.ok]
    before = set(engine.gallery.ids)
    gallery = engine.gallery.extend(Gallery.from_records(added, emb.embeddings))
    for stage in engine.stages:  # local features now, so the first match does not pay for them
        if hasattr(stage, "store"):
            stage.store.get(added, stage.workers, progress=progress, desc=f"{stage.name} of new photos")
    gallery.save(engine.run.gallery_path)
    new_ids = {r.individual_id for r in added} - before
    skipped = skipped_note(emb) + (f", {already} already in the gallery" if already else "")
    return (f"enrolled {len(added)} photos ({len(new_ids)} new individuals{skipped}); gallery now "
            f"{len(gallery)} photos of {len(set(gallery.ids))} individuals ({time.perf_counter() - t0:.1f} s)")
