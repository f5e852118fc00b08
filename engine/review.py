"""The review page of `match --report`: each query beside its top-5 with the evidence, and a
decision to record (see engine/report.py)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from core.catalog import format_bbox
from core.errors import ImageError
from core.images import load_image_reduced
from engine.pipeline import Engine, QueryResult
from engine.report import ReportCandidate, ReportQuery, write_report


def _image(record):
    """The photo as the stages saw it (after the bbox crop), so inlier coordinates line up: decoded
    reduced where it is large (thumbnails are under 256 pixels), with its full size."""
    try:
        rgb, reduction = load_image_reduced(record.path, record.bbox, min_side=256)
        return rgb, reduction.size
    except ImageError:
        return None  # the report shows a placeholder


def _shown_name(path, root: Path | None) -> str:
    """A gallery photo as the catalog lists it, relative to the gallery's images folder ("ind004/4.jpg":
    a file name alone recurs in every animal's folder); its whole path where it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except (TypeError, ValueError):  # (no root, or a photo enrolled from another folder)
        return str(path)


def write_review(engine: Engine, results: Sequence[QueryResult], path: Path, tau: float,
                 truth: dict[str, str] | None = None, unreadable: Sequence[tuple] = ()) -> Path:
    """Queries are ordered by how close their best score is to the threshold: the answers a
    person should check first are those the engine was least sure of, either way. `unreadable`:
    (record, reason) of the photos that could not be read, listed on the page."""
    entries = []
    root = engine.run.images_root()
    for r in results:
        cands = []
        for c in r.candidates:
            xy = c.evidence.get("inliers_xy")
            record = engine.gallery.record(c.gallery_index)
            name = _shown_name(record.path, root)
            if c.evidence.get("same_photo"):
                name += " (the same photo)"
            cands.append(ReportCandidate(
                individual_id=c.individual_id, fused=c.score, stage_scores=dict(c.stages),
                gallery_image=partial(_image, record), gallery_key=f"{c.gallery_index}",
                gallery_name=name,
                inliers_xy=np.asarray(xy, np.float32).reshape(-1, 4) if xy is not None and len(xy) else None))
        top = r.candidates[0].score if r.candidates else 0.0
        entries.append(ReportQuery(query_image=partial(_image, r.record), query_name=r.name,
                                   truth=(truth or {}).get(r.name), confidence=abs(top - tau),
                                   candidates=cands, predictions=r.predictions,
                                   image_path=str(Path(r.record.path).resolve()),
                                   viewpoint=r.record.viewpoint, bbox=format_bbox(r.record.bbox)))
    return write_report(path, entries, title=f"Matches against {engine.run.path.name} "
                                            f"(new_individual below {tau:.3f})",
                        skipped=[(rec.image, reason) for rec, reason in unreadable])
