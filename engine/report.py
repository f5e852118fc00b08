"""The review page: per query, the evidence behind its answer and a place to record a decision.

`write_report(path, entries)` writes `path` (HTML from the Jinja2 template engine/templates/review.html)
and a sidecar folder `<stem>_files/` of review-size WebP thumbnails, one per distinct photo. The page
needs no server and loads nothing from the network: it opens from disk, renders one page of queries
at a time, draws keypoint matches as SVG lines over the thumbnails, keeps the reviewer's decisions in
the browser's storage and exports them as decisions.csv (image,decision,individual_id,note,viewpoint,bbox) for
`cli.py enroll --decisions`. Queries come doubtful first (confidence ascending) so a researcher checks
the answers that most need a human eye before the easy ones.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union
from urllib.parse import quote

import cv2
import numpy as np

from core.catalog import IMAGE_SUFFIXES
from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL
from core.runfolder import atomic_write_bytes

TEMPLATES = Path(__file__).resolve().parent / "templates"

log = logging.getLogger(__name__)


ImageSource = Union[np.ndarray, Path, str, tuple, Callable[[], Union[np.ndarray, tuple, None]], None]


@dataclass
class ReportCandidate:
    individual_id: str
    fused: float                             # fused P(same individual)
    stage_scores: dict[str, float | None]    # per stage; None or NaN = stage not run
    # best-matching gallery photo: RGB uint8 array, file, or a function returning the array (called
    # once per distinct gallery_key, so a photo shown for many queries is decoded once), or the
    # array and the (h, w) of the photo it is a reduction of (core.images.load_image_reduced)
    gallery_image: ImageSource
    gallery_name: str
    # (m, 4) rows x_q, y_q, x_g, y_g in pixels of the images as given above (after any crop the
    # caller applied; of the full photo where a reduction says its size), or None when keypoints
    # were not matched for this candidate
    inliers_xy: np.ndarray | None = None
    gallery_key: str | None = None           # identifies the photo for the thumbnail cache


@dataclass
class ReportQuery:
    query_image: ImageSource  # as gallery_image; a function is called when the page is written
    query_name: str
    truth: str | None                        # true individual, `new_individual`, or None if unknown
    confidence: float
    candidates: list[ReportCandidate] = field(default_factory=list)
    predictions: list[str] | None = None     # the answer tokens (with `new_individual`), if known
    image_path: str | None = None            # the photo's file, written to decisions.csv (default: the name)
    # the photo's viewpoint and box as the queries catalog gave them ("x,y,w,h"), written to
    # decisions.csv so that enroll adds the photo as it was matched
    viewpoint: str | None = None
    bbox: str | None = None


@dataclass(frozen=True)
class ReportConfig:
    # longest side of the thumbnails (candidates smaller: five of them per query, and a gallery photo
    # recurs across queries), and their WebP quality: ~6 and ~4 kB per photo on the development set,
    # so 200 queries stay under 6 MB even when no gallery photo recurs
    query_px: int = 224
    candidate_px: int = 176
    quality: int = 40
    max_lines: int = 60        # inlier lines drawn per match (evenly subsampled beyond)
    max_candidates: int = 5
    page_size: int = 20        # queries rendered per page

    def __post_init__(self):
        if not 16 <= min(self.query_px, self.candidate_px) <= max(self.query_px, self.candidate_px) <= 255:
            raise ValueError("thumbnail sides must be 16 to 255 pixels (inliers are stored as bytes)")


def load_rgb(image) -> np.ndarray | None:
    """RGB uint8 (h, w, 3) from an array or a file; None if it cannot be read."""
    if image is None:
        return None
    try:
        if isinstance(image, np.ndarray):
            a = image
            if a.ndim == 2:
                a = np.repeat(a[:, :, None], 3, axis=2)
            if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
                return None
            a = a[:, :, :3]
            if a.dtype != np.uint8:
                a = np.clip(a, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(a)
        if not Path(image).is_file():
            log.warning("report: image not found: %s", image)
            return None
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            from PIL import Image  # formats OpenCV lacks; only needed on this rare path
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    except Exception as exc:  # an unreadable photo must not stop the report
        log.warning("report: cannot read image %s: %s", image if not isinstance(image, np.ndarray) else "array", exc)
        return None


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def _data_uri(rgb: np.ndarray, quality: int) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


class _Thumbnails:
    """Review-size WebP files in the sidecar folder, named by their content (a photo shown for many
    queries is stored once); returns for each its src relative to the page, size and scale."""

    def __init__(self, folder: Path, src_prefix: str, cfg: ReportConfig):
        self.folder, self.prefix, self.cfg = folder, src_prefix, cfg
        self.by_key: dict[str, dict | None] = {}
        self.bytes = 0

    def add(self, image, px: int, key: str | None = None) -> dict | None:
        if key is not None and key in self.by_key:
            return self.by_key[key]
        image = image() if callable(image) else image
        image, full = image if isinstance(image, tuple) else (image, None)
        rgb = load_rgb(image)
        thumb = None
        if rgb is not None:
            h, w = rgb.shape[:2]
            H, W = full or (h, w)  # the photo the inlier positions are in
            scale = min(1.0, px / max(h, w))
            small = _resize(rgb, scale)
            ok, buf = cv2.imencode(".webp", cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_WEBP_QUALITY, self.cfg.quality])
            if not ok:
                raise RuntimeError("WebP encoding failed")
            data = buf.tobytes()
            name = hashlib.sha1(data).hexdigest()[:20] + ".webp"
            target = self.folder / name
            if not target.exists():
                target.write_bytes(data)
                self.bytes += len(data)
            thumb = {"src": f"{self.prefix}/{name}", "w": small.shape[1], "h": small.shape[0],
                     "sx": small.shape[1] / W, "sy": small.shape[0] / H}
        if key is not None:
            self.by_key[key] = thumb
        return thumb


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else round(f, 4)


def _inliers(xy, q: dict | None, g: dict | None, max_lines: int) -> str | None:
    """Inlier pairs in whole thumbnail pixels (x_q, y_q, x_g, y_g), at most max_lines (evenly
    subsampled), as base64 of uint8 quadruples: thumbnails are under 256 pixels, and 200 queries of
    5 candidates with 60 lines each then take 0.3 MB of the page instead of 1 MB as JSON numbers."""
    if xy is None:
        return None
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 4)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if q is None or g is None:
        return ""
    if len(pts) > max_lines:
        pts = pts[np.linspace(0, len(pts) - 1, max_lines).round().astype(int)]
    pts = pts * np.array([q["sx"], q["sy"], g["sx"], g["sy"]])
    return base64.b64encode(np.clip(np.round(pts), 0, 255).astype(np.uint8).tobytes()).decode("ascii")


def _conf_key(q: ReportQuery) -> float:
    c = float(q.confidence) if q.confidence is not None else float("nan")
    return -math.inf if math.isnan(c) else c  # unknown confidence counts as the most doubtful


def _rank1_correct(q: ReportQuery) -> bool:
    if q.predictions:
        return q.predictions[0] == q.truth
    return bool(q.candidates) and q.candidates[0].individual_id == q.truth


def _query_data(q: ReportQuery, thumbs: _Thumbnails, cfg: ReportConfig) -> dict:
    qthumb = thumbs.add(q.query_image, cfg.query_px)
    cands = []
    for c in list(q.candidates)[:cfg.max_candidates]:
        gthumb = thumbs.add(c.gallery_image, cfg.candidate_px, c.gallery_key)
        inl = _inliers(c.inliers_xy, qthumb, gthumb, cfg.max_lines)
        n_in = None if c.inliers_xy is None else int(np.asarray(c.inliers_xy).reshape(-1, 4).shape[0])
        cands.append({"id": str(c.individual_id), "p": _number(c.fused), "name": str(c.gallery_name),
                      "stages": {str(k): _number(v) for k, v in c.stage_scores.items()},
                      "thumb": gthumb, "inliers": inl, "n_inliers": n_in})
    ids = [c["id"] for c in cands]
    return {"name": str(q.query_name), "path": str(q.image_path or q.query_name), "truth": q.truth,
            "viewpoint": q.viewpoint or "", "bbox": q.bbox or "",
            "confidence": _number(q.confidence), "answer": list(q.predictions or []), "thumb": qthumb,
            "candidates": cands,
            "truth_missing": q.truth is not None and q.truth != NEW_INDIVIDUAL and q.truth not in ids}


def _script_json(data) -> str:
    """JSON safe inside <script type="application/json">: no '<', '>' or '&' (escaped as \\u00XX), so
    nothing in a name can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def thumbnails_folder(path: str | os.PathLike) -> Path:
    """The folder of thumbnails a review page at `path` keeps beside it (`<stem>_files/`)."""
    path = Path(path)
    return path.with_name(path.stem + "_files")


def check_report_path(path: str | os.PathLike, option: str = "--report") -> Path:
    """Refuse, before any work, a review page that is named like a photo, or whose thumbnail folder would
    replace a folder holding anything but an earlier page's thumbnails (WebP files)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{option} {path}: the review page is an HTML file (e.g. {path.with_suffix('.html').name})")
    folder = thumbnails_folder(path)
    if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(
            not (_THUMBNAIL.fullmatch(f.name) and f.is_file()) for f in folder.iterdir()
            if not (f.name.startswith(".") or f.name in _SYSTEM_FILES)))):
        raise UserError(f"{option} {path} keeps its thumbnails in {folder}, which holds other files (it would be "
                        "replaced): choose another name for the page")
    return path


_THUMBNAIL = re.compile(r"[0-9a-f]{20}\.webp")  # the names _Thumbnails gives (a hash of the content)
_SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}  # what file browsers leave in a folder they showed (and .DS_Store)


def write_report(path: str | os.PathLike, entries: Sequence[ReportQuery], title: str = "Matches",
                 config: ReportConfig = ReportConfig(), skipped: Sequence[tuple[str, str]] = ()) -> Path:
    """Write the page and its thumbnail folder; return the page's path. The folder is filled under
    a temporary name and both are renamed into place, so an interrupted write leaves no half page (`match`
    removes an earlier page before it writes new predictions: stopped meanwhile, it leaves none rather than
    one of earlier answers). `skipped`: (name, reason) of the photos that could not be read, listed on the page."""
    import jinja2

    path = check_report_path(path, "review page")
    folder = thumbnails_folder(path)
    tmp_folder = path.with_name(f".{path.stem}_files.tmp{os.getpid()}")
    shutil.rmtree(tmp_folder, ignore_errors=True)
    tmp_folder.mkdir(parents=True)
    try:
        thumbs = _Thumbnails(tmp_folder, quote(folder.name), config)  # the page names the final folder
        order = sorted(range(len(entries)), key=lambda k: (_conf_key(entries[k]), str(entries[k].query_name)))
        queries = [_query_data(entries[k], thumbs, config) for k in order]
        labelled = [q for q in entries if q.truth is not None]
        summary = [f"{len(entries)} queries"] + ([f"{len(skipped)} unreadable"] if skipped else [])
        if labelled:
            summary.append(f"{len(labelled)} with known truth, {sum(map(_rank1_correct, labelled))} right at rank 1")
        review_id = hashlib.sha1(json.dumps([title] + [q["path"] for q in queries]).encode()).hexdigest()[:16]
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        doc = env.get_template("review.html").render(
            title=title, summary=" · ".join(summary), page_size=config.page_size, skipped=list(skipped),
            data=_script_json({"id": review_id, "title": title, "new": NEW_INDIVIDUAL, "queries": queries,
                               "page_size": config.page_size}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp_folder.rename(folder)
    except BaseException:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        raise
    atomic_write_bytes(path, doc.encode("utf-8"))
    log.info("review page: %d queries, %.2f MB page + %.2f MB thumbnails -> %s", len(entries),
             len(doc) / 1e6, thumbs.bytes / 1e6, path)
    return path
