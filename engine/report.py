"""One self-contained HTML file showing, per query, the evidence behind its answer.

The file opens from disk in any browser: images are inline JPEG data URIs, CSS is inline, there is
no script and no external URL. Queries come doubtful first (confidence ascending) so a researcher
checks the answers that most need a human eye before the easy ones.
"""
from __future__ import annotations

import base64
import html
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from core.metrics import NEW_INDIVIDUAL
from core.runfolder import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class ReportCandidate:
    individual_id: str
    fused: float                             # fused P(same individual)
    stage_scores: dict[str, float | None]    # per stage; None or NaN = stage not run
    gallery_image: np.ndarray | Path | str | None  # best-matching gallery photo (RGB uint8 array or file)
    gallery_name: str
    # (m, 4) rows x_q, y_q, x_g, y_g in pixels of the images as given above (after any crop the
    # caller applied), or None when keypoints were not matched for this candidate
    inliers_xy: np.ndarray | None = None


@dataclass
class ReportQuery:
    query_image: np.ndarray | Path | str | None
    query_name: str
    truth: str | None                        # true individual, `new_individual`, or None if unknown
    confidence: float
    candidates: list[ReportCandidate] = field(default_factory=list)
    predictions: list[str] | None = None     # the answer tokens (with `new_individual`), if known


@dataclass(frozen=True)
class ReportConfig:
    thumb_px: int = 240        # longest side of a thumbnail
    match_height: int = 240    # height of each half of a query | gallery match picture
    jpeg_quality: int = 80
    max_lines: int = 120       # inlier lines drawn per match picture (evenly subsampled beyond)
    max_candidates: int = 5


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{margin:0 0 4px 0;font-size:22px} h2{font-size:17px;margin:0 0 4px 0}
header p{margin:2px 0;color:#444}
nav{columns:4 220px;font-size:13px;margin:8px 0 16px 0}
nav a{display:block;text-decoration:none;color:#0645ad;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
section.query{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px;margin:0 0 18px 0}
.meta{font-size:13px;color:#444;margin:0 0 8px 0} .meta code{background:#f0f0f0;padding:0 3px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;padding:6px;border:2px solid #e4e4e4;border-radius:5px;background:#fff;max-width:260px}
figure.query{border-color:#5b7fd6;background:#f3f6ff}
figure.correct{border-color:#2e9d46;background:#effaf1}
figure img{display:block;max-width:240px;max-height:240px}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}
.fused{font-weight:bold;font-size:14px}
.ok{color:#2e9d46;font-weight:bold}
.missing{display:flex;align-items:center;justify-content:center;width:200px;height:150px;background:#eee;color:#888;font-size:12px;border:1px dashed #bbb}
table.stages{border-collapse:collapse;font-size:11px;margin-top:3px}
table.stages td{padding:0 6px 0 0}
.matches{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.matches figure{max-width:none} .matches img{max-width:none;max-height:none}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "not run"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _esc(v)
    return "not run" if math.isnan(f) else f"{f:.{digits}f}"


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


def _img_tag(rgb: np.ndarray | None, alt: str, cfg: ReportConfig) -> str:
    if rgb is None:
        return '<div class="missing">image unavailable</div>'
    h, w = rgb.shape[:2]
    thumb = _resize(rgb, min(1.0, cfg.thumb_px / max(h, w)))
    return f'<img src="{_data_uri(thumb, cfg.jpeg_quality)}" alt="{_esc(alt)}">'


def draw_matches(query_rgb: np.ndarray, gallery_rgb: np.ndarray, inliers_xy: np.ndarray,
                 height: int = 240, max_lines: int = 120) -> np.ndarray:
    """Query | gallery side by side, each scaled to `height` rows, with the inlier pairs joined by
    lines. `inliers_xy` rows are (x_q, y_q, x_g, y_g) in the pixels of the two given images."""
    gap = 8
    sq = height / query_rgb.shape[0]
    sg = height / gallery_rgb.shape[0]
    q = _resize(query_rgb, sq)
    g = _resize(gallery_rgb, sg)
    canvas = np.full((max(q.shape[0], g.shape[0]), q.shape[1] + gap + g.shape[1], 3), 255, np.uint8)
    canvas[:q.shape[0], :q.shape[1]] = q
    canvas[:g.shape[0], q.shape[1] + gap:] = g
    pts = np.asarray(inliers_xy, dtype=np.float64).reshape(-1, 4)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) > max_lines:
        pts = pts[np.linspace(0, len(pts) - 1, max_lines).round().astype(int)]
    # sub-pixel line ends through cv2's fixed-point `shift`, so thumbnails stay accurate
    shift = 4
    one = 1 << shift
    for k, (xq, yq, xg, yg) in enumerate(pts):
        hue = int(180 * k / max(1, len(pts)))
        color = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        a = (round(xq * sq * one), round(yq * sq * one))
        b = (round((xg * sg + q.shape[1] + gap) * one), round(yg * sg * one))
        cv2.line(canvas, a, b, color, 1, cv2.LINE_AA, shift)
        cv2.circle(canvas, a, 2 * one, color, -1, cv2.LINE_AA, shift)
        cv2.circle(canvas, b, 2 * one, color, -1, cv2.LINE_AA, shift)
    return canvas


def _conf_key(q: ReportQuery) -> float:
    c = float(q.confidence) if q.confidence is not None else float("nan")
    return -math.inf if math.isnan(c) else c  # unknown confidence counts as the most doubtful


def _rank1_correct(q: ReportQuery) -> bool:
    if q.predictions:
        return q.predictions[0] == q.truth
    return bool(q.candidates) and q.candidates[0].individual_id == q.truth


def _section(i: int, q: ReportQuery, cfg: ReportConfig) -> tuple[str, int]:
    qrgb = load_rgb(q.query_image)
    cands = list(q.candidates)[:cfg.max_candidates]
    meta = [f"confidence <b>{_fmt(q.confidence)}</b>"]
    if q.truth is not None:
        meta.append(f"truth <code>{_esc(q.truth)}</code>")
        ids = [c.individual_id for c in cands]
        if q.truth != NEW_INDIVIDUAL and q.truth not in ids:
            meta.append("true individual not among the candidates")
    if q.predictions:
        meta.append("answer <code>" + " ".join(_esc(p) for p in q.predictions) + "</code>")
    parts = [f'<section class="query" id="q-{i}" data-confidence="{_fmt(q.confidence, 6)}">',
             f"<h2>{i + 1}. {_esc(q.query_name)}</h2>",
             '<p class="meta">' + " &middot; ".join(meta) + "</p>",
             '<div class="row">',
             f'<figure class="query">{_img_tag(qrgb, q.query_name, cfg)}'
             f"<figcaption>query<br>{_esc(q.query_name)}</figcaption></figure>"]
    matches = []
    n_drawn = 0
    for r, c in enumerate(cands, 1):
        correct = q.truth is not None and c.individual_id == q.truth
        grgb = load_rgb(c.gallery_image)
        rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in c.stage_scores.items())
        n_in = 0 if c.inliers_xy is None else int(np.asarray(c.inliers_xy).reshape(-1, 4).shape[0])
        parts.append(
            f'<figure class="cand{" correct" if correct else ""}">{_img_tag(grgb, c.gallery_name, cfg)}'
            f"<figcaption>{r}. <b>{_esc(c.individual_id)}</b>"
            + (' <span class="ok">&#10003; true individual</span>' if correct else "")
            + f'<br><span class="fused">P(same) {_fmt(c.fused)}</span>'
            + f'<table class="stages">{rows}</table>'
            + (f"{n_in} keypoint inliers<br>" if c.inliers_xy is not None else "")
            + f"{_esc(c.gallery_name)}</figcaption></figure>")
        if n_in and qrgb is not None and grgb is not None:
            pic = draw_matches(qrgb, grgb, c.inliers_xy, cfg.match_height, cfg.max_lines)
            matches.append(
                f'<figure class="match"><img src="{_data_uri(pic, cfg.jpeg_quality)}" '
                f'alt="{_esc("matches " + q.query_name + " / " + c.gallery_name)}">'
                f"<figcaption>{r}. {_esc(c.individual_id)}: {n_in} inliers "
                f"(query left, {_esc(c.gallery_name)} right)</figcaption></figure>")
            n_drawn += 1
    if not cands:
        parts.append('<p class="meta">no candidate</p>')
    parts.append("</div>")
    if matches:
        parts.append('<div class="matches">' + "".join(matches) + "</div>")
    parts.append("</section>")
    return "\n".join(parts), n_drawn


def write_report(path: str | os.PathLike, entries: Sequence[ReportQuery], title: str = "Matches",
                 config: ReportConfig = ReportConfig()) -> Path:
    """Write the report and return its path. Written to a temporary name then renamed."""
    path = Path(path)
    order = sorted(range(len(entries)), key=lambda k: (_conf_key(entries[k]), str(entries[k].query_name)))
    sections = []
    n_drawn = 0
    for i, k in enumerate(order):
        text, d = _section(i, entries[k], config)
        sections.append(text)
        n_drawn += d
    labelled = [q for q in entries if q.truth is not None]
    summary = [f"{len(entries)} queries", f"{n_drawn} match pictures"]
    if labelled:
        ok = sum(_rank1_correct(q) for q in labelled)
        summary.insert(1, f"{len(labelled)} with known truth, {ok} right at rank 1")
    nav = "".join(f'<a href="#q-{i}">{i + 1}. {_esc(entries[k].query_name)} '
                  f"({_fmt(entries[k].confidence, 2)})</a>" for i, k in enumerate(order))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
           f"<header><h1>{_esc(title)}</h1><p>{' &middot; '.join(summary)}</p>"
           "<p>Queries sorted by confidence, most doubtful first. P(same) is the fused probability;"
           " the table lists each stage's score (\"not run\" where a stage was skipped).</p>"
           f"<nav>{nav}</nav></header>\n" + "\n".join(sections) + "\n</body></html>\n")
    atomic_write_bytes(path, doc.encode("utf-8"))
    log.info("report: %d queries, %.1f MB -> %s", len(entries), len(doc) / 1e6, path)
    return path
