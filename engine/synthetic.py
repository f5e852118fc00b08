"""Seeded synthetic "nyala": a built-in sample of striped animals for the demo and the tests.

The real photos may not be redistributed, so the demo and the tests draw their own animals. An
individual is a random pattern of white stripes and spots on a brown or grey coat, on a simple
animal silhouette (body, neck, head, four legs, tail). Its `left` and `right` flanks carry
independent patterns, as real flanks do; the coat colours come from a small palette, so colour
alone does not tell individuals apart, only the pattern does.

A photo is the canonical side view seen again: a perspective warp, a scale and a small rotation,
over a cluttered savanna background, with a branch or a bush in front of part of the body, uneven
light, blur, noise and JPEG. `difficulty` scales all of it: 0 is the canonical view itself, 1 the
default, more is harder. Photos are never mirrored: a mirrored flank is another pattern.

Everything is drawn with OpenCV from a numpy Generator, so a seed gives byte-identical files on
one machine. Drawing happens at 2x and is area-downsampled, which anti-aliases the stripes.
"""
from __future__ import annotations

import csv
import functools
import logging
import math
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

VIEWPOINTS = ("left", "right")
NEW_INDIVIDUAL = "new_individual"  # same token as core.metrics
DEFAULT_SIZE = (192, 256)  # (height, width)
_REF_W, _REF_H = 256.0, 192.0  # the animal is designed on this canvas and scaled to the requested size
_SS = 2  # supersampling factor of the canonical drawing
_SHIFT = 4  # fractional bits for cv2 polygon coordinates
_PLAIN_BG = (0.80, 0.80, 0.76)

# A few coats shared by many individuals, so that the coat colour is a weak cue at best.
_COATS = {
    "female": ((178, 106, 54), (192, 122, 62), (160, 94, 46), (200, 138, 78)),
    "male": ((72, 68, 74), (92, 86, 88), (62, 60, 68), (104, 96, 90)),
}
_MARK = (238, 234, 224)


@dataclass(frozen=True)
class Stripe:
    """One white stripe, in body coordinates: u along the body (-1 chest .. 1 rump), v down (-1 back .. 1 belly)."""

    u: float
    v_top: float
    v_bottom: float
    tilt: float  # horizontal drift per unit of v, in units of the body half-height
    curve: float  # extra drift growing with v^2
    width: float  # in reference pixels (256x192 canvas)
    gap_at: float  # v where the stripe is broken, meaningless when gap_len == 0
    gap_len: float


@dataclass(frozen=True)
class Pattern:
    stripes: tuple[Stripe, ...]
    spots: tuple[tuple[float, float, float], ...]  # (u, v, radius in reference pixels)


@dataclass(frozen=True)
class Individual:
    """Everything needed to render one animal; `make_individual` derives it from a seed."""

    id: str
    seed: int
    sex: str  # "female": rufous coat; "male": grey coat, horns, belly fringe, pale lower legs
    coat: tuple[int, int, int]
    mark: tuple[int, int, int]  # colour of stripes and spots
    leg: tuple[int, int, int]  # colour of the lower legs
    body_length: float  # shape factors around 1
    body_height: float
    leg_length: float
    neck_angle: float  # degrees above the horizontal
    neck_length: float
    head_angle: float  # degrees below the horizontal
    stride: float  # spread of the legs in reference pixels
    fur_seed: int
    left: Pattern
    right: Pattern

    def pattern(self, viewpoint: str) -> Pattern:
        _check_viewpoint(viewpoint)
        return self.left if viewpoint == "left" else self.right


def _check_viewpoint(viewpoint: str) -> None:
    if viewpoint not in VIEWPOINTS:
        raise ValueError(f"viewpoint must be one of {VIEWPOINTS}, not {viewpoint!r}")


def _crosses(stripes: list[Stripe]) -> bool:
    """Whether two neighbouring stripes touch somewhere over the flank (they would merge into a blob)."""
    v = np.linspace(-1.0, 1.0, 21)
    for s, t in zip(stripes, stripes[1:]):
        lo, hi = max(s.v_top, t.v_top), min(s.v_bottom, t.v_bottom)
        vv = v[(v >= lo) & (v <= hi)]
        if len(vv) == 0:
            continue
        # body half-axes are about 58 x 27 reference pixels
        xs = 58 * s.u + (s.tilt * vv + s.curve * vv * vv) * 27
        xt = 58 * t.u + (t.tilt * vv + t.curve * vv * vv) * 27
        if np.min(xt - xs) < (s.width + t.width) / 2 + 2.0:
            return True
    return False


def _make_pattern(rng: np.random.Generator) -> Pattern:
    # tilt and bend vary smoothly from stripe to stripe, as on real flanks, around an individual style
    style_tilt, style_curve = rng.normal(0, 0.12), rng.normal(0, 0.12)
    for _ in range(200):
        n = int(rng.integers(7, 14))
        # uniform positions with a minimum spacing: sorted uniforms over the slack, plus the spacing
        spacing = 0.09
        us = -0.82 + np.sort(rng.uniform(0, 1.74 - spacing * (n - 1), n)) + spacing * np.arange(n)
        drift = np.cumsum(rng.normal(0, 0.06, n))
        stripes = []
        for j, u in enumerate(us):
            gap = rng.random() < 0.3
            stripes.append(Stripe(
                u=float(u),
                v_top=float(-1.15 if rng.random() < 0.75 else rng.uniform(-0.9, -0.4)),
                v_bottom=float(rng.uniform(0.05, 0.95)),
                # stripes fan out towards the rump
                tilt=float(0.3 * u + style_tilt + drift[j] - drift.mean() + rng.normal(0, 0.05)),
                curve=float(style_curve + rng.normal(0, 0.07)),
                width=float(rng.uniform(2.2, 3.8)),
                gap_at=float(rng.uniform(-0.5, 0.5)) if gap else 0.0,
                gap_len=float(rng.uniform(0.12, 0.3)) if gap else 0.0,
            ))
        if not _crosses(stripes):
            break
    # spots mostly in a loose row along the lower flank, a few on the haunch
    n_spots = int(rng.integers(2, 10))
    spots = tuple(
        (float(rng.uniform(-0.7, 0.95)), float(np.clip(rng.normal(0.45, 0.25), -0.2, 0.85)), float(rng.uniform(1.8, 3.4)))
        for _ in range(n_spots)
    )
    return Pattern(stripes=tuple(stripes), spots=spots)


def make_individual(individual_id: str, seed: int) -> Individual:
    """A random individual; the same (id, seed) always gives the same animal. The id does not enter the draw."""
    rng = np.random.default_rng(seed)
    sex = "male" if rng.random() < 0.4 else "female"
    base = np.array(_COATS[sex][int(rng.integers(len(_COATS[sex])))], dtype=float)
    coat = tuple(int(c) for c in np.clip(base + rng.normal(0, 5, 3), 0, 255))
    mark = tuple(int(c) for c in np.clip(np.array(_MARK) + rng.normal(0, 6, 3), 0, 255))
    leg = (196, 156, 78) if sex == "male" else tuple(int(c * 0.92) for c in coat)
    return Individual(
        id=individual_id,
        seed=int(seed),
        sex=sex,
        coat=coat,
        mark=mark,
        leg=tuple(int(c) for c in leg),
        body_length=float(rng.uniform(0.92, 1.08)),
        body_height=float(rng.uniform(0.9, 1.1)),
        leg_length=float(rng.uniform(0.9, 1.1)),
        neck_angle=float(rng.uniform(48, 68)),
        neck_length=float(rng.uniform(0.9, 1.1)),
        head_angle=float(rng.uniform(20, 45)),
        stride=float(rng.uniform(-6, 8)),
        fur_seed=int(rng.integers(2**31)),
        left=_make_pattern(rng),
        right=_make_pattern(rng),
    )


# ---------------------------------------------------------------------------------------------
# Canonical drawing


@dataclass(frozen=True)
class _Frame:
    """Reference canvas (256x192) -> pixels of the requested size (times `ss` when supersampled)."""

    k: float
    ox: float
    oy: float

    @staticmethod
    def of(size: tuple[int, int], ss: int = 1) -> "_Frame":
        h, w = size
        k = min(w / _REF_W, h / _REF_H)
        return _Frame(k * ss, (w - _REF_W * k) / 2 * ss, (h - _REF_H * k) / 2 * ss)

    def pts(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        return np.stack([p[:, 0] * self.k + self.ox, p[:, 1] * self.k + self.oy], axis=1)


def _fixed(p: np.ndarray) -> np.ndarray:
    """Points for cv2 polygon calls with `shift=_SHIFT` (sub-pixel precision)."""
    return np.round(np.asarray(p) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _fx(*values: float) -> tuple[int, ...]:
    """Scalars for cv2 circle/ellipse calls with `shift=_SHIFT`."""
    return tuple(int(round(float(v) * (1 << _SHIFT))) for v in values)


def _ribbon(center: np.ndarray, widths) -> np.ndarray:
    """Polygon around a polyline with a width at each vertex (limbs, neck, tail, stripes)."""
    c = np.asarray(center, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64).reshape(-1) / 2
    d = np.gradient(c, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1)
    return np.concatenate([c + nrm * w[:, None], (c - nrm * w[:, None])[::-1]])


class _Canvas:
    """Premultiplied RGB + alpha, both uint8, so that cv2's anti-aliased drawing composes correctly."""

    def __init__(self, h: int, w: int, frame: _Frame):
        self.rgb = np.zeros((h, w, 3), np.uint8)
        self.alpha = np.zeros((h, w), np.uint8)
        self.f = frame

    def poly(self, ref_pts, colour) -> None:
        pts = _fixed(self.f.pts(ref_pts))
        cv2.fillPoly(self.rgb, [pts], tuple(int(c) for c in colour), cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(self.alpha, [pts], 255, cv2.LINE_AA, _SHIFT)

    def ribbon(self, center, widths, colour) -> None:
        self.poly(_ribbon(np.asarray(center, float), np.asarray(widths, float)), colour)

    def ellipse(self, c, axes, angle, colour, target=None) -> None:
        ctr = _fx(*self.f.pts(c)[0])
        ax = _fx(axes[0] * self.f.k, axes[1] * self.f.k)
        for img, col in ((self.rgb, colour), (self.alpha, 255)) if target is None else ((target, 255),):
            cv2.ellipse(img, ctr, ax, angle, 0, 360, col if np.isscalar(col) else tuple(int(x) for x in col),
                        -1, cv2.LINE_AA, _SHIFT)

    def line(self, a, b, width, colour) -> None:
        self.ribbon(np.array([a, b], float), [width, width], colour)


def _shade(colour, factor) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(c * factor))) for c in colour)


def _noise_field(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] with features about `cell` pixels wide."""
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / 1.5, -1.5, 1.5)


def _body_geometry(ind: Individual) -> dict:
    """Key points of the animal facing left, in reference pixels."""
    a, b = 58.0 * ind.body_length, 27.0 * ind.body_height
    ground = 174.0
    leg_h = 52.0 * ind.leg_length
    cx, cy = 140.0, ground - leg_h - b
    na = math.radians(ind.neck_angle)
    neck_root = np.array([cx - 0.78 * a, cy - 0.2 * b])
    neck_len = 46.0 * ind.neck_length
    head_base = neck_root + neck_len * np.array([-math.cos(na), -math.sin(na)])
    ha = math.radians(ind.head_angle)
    head_dir = np.array([-math.cos(ha), math.sin(ha)])
    return dict(a=a, b=b, cx=cx, cy=cy, ground=ground, neck_root=neck_root, head_base=head_base,
                head_dir=head_dir)


def _stripe_centerline(s: Stripe, g: dict, v0: float, v1: float) -> np.ndarray:
    v = np.linspace(v0, v1, 12)
    x = g["cx"] + s.u * g["a"] + (s.tilt * v + s.curve * (v * v - 0.3)) * g["b"]
    y = g["cy"] + v * g["b"]
    return np.stack([x, y], axis=1)


def _draw_pattern(cv: _Canvas, target: np.ndarray, pat: Pattern, g: dict) -> None:
    for s in pat.stripes:
        pieces = [(s.v_top, s.v_bottom)]
        if s.gap_len > 0 and s.v_top < s.gap_at < s.v_bottom:
            pieces = [(s.v_top, s.gap_at), (s.gap_at + s.gap_len, s.v_bottom)]
        for v0, v1 in pieces:
            if v1 - v0 < 0.08:
                continue
            c = _stripe_centerline(s, g, v0, v1)
            # full width over the back, thinning out towards the belly
            w = s.width * np.linspace(1.0, 0.55, len(c))
            pts = _fixed(cv.f.pts(_ribbon(c, w)))
            cv2.fillPoly(target, [pts], 255, cv2.LINE_AA, _SHIFT)
            # rounded ends: stripe ends are the corners a keypoint detector locks onto
            for end, wd in ((c[0], w[0]), (c[-1], w[-1])):
                e = cv.f.pts(end)[0]
                cv2.circle(target, _fx(*e), _fx(wd / 2 * cv.f.k)[0], 255, -1, cv2.LINE_AA, _SHIFT)
    for u, v, r in pat.spots:
        cv.ellipse((g["cx"] + u * g["a"], g["cy"] + v * g["b"]), (r, r * 0.85), 0, 255, target=target)


def _leg(cv: _Canvas, top, knee, foot, widths, coat, leg_col, hoof) -> None:
    top, knee, foot = (np.asarray(p, float) for p in (top, knee, foot))
    mid = knee + 0.45 * (foot - knee)
    cv.ribbon(np.array([top, 0.5 * (top + knee), knee]), widths[:3], coat)
    cv.ribbon(np.array([knee, mid, foot]), widths[2:5], leg_col)
    cv.ribbon(np.array([foot - (0, 1.5), foot + (0, 3.0)]), [widths[4] * 1.1, widths[4] * 1.2], hoof)


def _draw_animal(ind: Individual, viewpoint: str, size: tuple[int, int]):
    """Canonical layer at `size`: premultiplied RGBA float32 in [0,1], and the pattern mask."""
    h, w = size
    f = _Frame.of(size, _SS)
    H, W = h * _SS, w * _SS
    cv = _Canvas(H, W, f)
    g = _body_geometry(ind)
    a, b, cx, cy, ground = g["a"], g["b"], g["cx"], g["cy"], g["ground"]
    coat, far = ind.coat, _shade(ind.coat, 0.78)
    hoof = (34, 30, 28)
    st = ind.stride

    # far-side legs first, darker, so the near legs and the body cover them
    _leg(cv, (cx - 0.55 * a, cy + 0.45 * b), (cx - 0.58 * a + st * 0.6 + 4, ground - 27),
         (cx - 0.56 * a + st + 5, ground - 3), [12, 9, 6.5, 5.0, 4.2], far, _shade(ind.leg, 0.8), hoof)
    _leg(cv, (cx + 0.58 * a, cy + 0.3 * b), (cx + 0.72 * a - st * 0.3 + 1, ground - 24),
         (cx + 0.62 * a - st * 0.6 - 4, ground - 3), [20, 12, 6.5, 5.0, 4.2], far, _shade(ind.leg, 0.8), hoof)
    # tail
    tail = np.array([[cx + 0.93 * a, cy - 0.6 * b], [cx + a + 6, cy - 0.25 * b], [cx + a + 7, cy + 0.35 * b],
                     [cx + a + 5, cy + 0.75 * b]])
    cv.ribbon(tail, [6, 5.5, 5, 4.5], _shade(coat, 0.9))
    cv.ribbon(tail[2:], [5, 5.5], (60, 52, 46))

    body = np.zeros((H, W), np.uint8)
    for c, ax in (((cx, cy), (a, b)), ((cx + 0.55 * a, cy - 0.05 * b), (0.5 * a, 1.03 * b)),
                  ((cx - 0.6 * a, cy + 0.05 * b), (0.45 * a, 0.95 * b))):
        cv.ellipse(c, ax, 0, coat)
        cv.ellipse(c, ax, 0, 255, target=body)

    # the pattern is drawn on its own mask and kept only inside the body
    pat = np.zeros((H, W), np.uint8)
    _draw_pattern(cv, pat, ind.pattern(viewpoint), g)
    # soft, slightly eroded body edge: stripes fade out at the outline instead of cutting it
    inner = cv2.GaussianBlur(cv2.erode(body, np.ones((3, 3), np.uint8)), (0, 0), 1.0)
    pat = (pat.astype(np.uint16) * inner // 255).astype(np.uint8)
    if ind.sex == "male":
        # dorsal crest and belly fringe: shared by all males, so no identity in them
        for t in np.linspace(-0.9, 0.95, 22):
            x = cx + t * a
            yb = cy + b * math.sqrt(max(0.0, 1 - (t * 0.97) ** 2))
            cv.line((x, yb - 2), (x + 1.5, yb + 7 + 3 * math.sin(7 * t)), 2.2, (48, 44, 46))
        crest = np.array([[cx + t * a, cy - b * math.sqrt(max(0.0, 1 - t * t)) + 1.0] for t in np.linspace(-0.8, 0.8, 15)])
        crest_mask = np.zeros_like(pat)  # kept out of `pat`: the crest identifies no one
        cv2.polylines(crest_mask, [_fixed(f.pts(crest))], False, 170, int(round(1.5 * f.k)), cv2.LINE_AA, _SHIFT)
        marks = np.maximum(pat, crest_mask)
    else:
        marks = pat
    m = marks.astype(np.float32)[..., None] / 255.0
    cv.rgb[:] = np.round(cv.rgb * (1 - m) + np.array(ind.mark, np.float32) * m).astype(np.uint8)

    # neck, head, ears, horns
    nr, hb, hd = g["neck_root"], g["head_base"], g["head_dir"]
    neck = np.array([nr + (8, 4), 0.5 * (nr + hb) + (1, 0), hb])
    cv.ribbon(neck, [30, 19, 14], coat)
    ear_dir = np.array([0.55, -0.83])
    for off, col in ((np.array([3.0, 0.0]), _shade(coat, 0.8)), (np.array([-1.0, 1.0]), coat)):
        c = hb + off + ear_dir * 7
        cv.ellipse(c, (8, 3.6), math.degrees(math.atan2(ear_dir[1], ear_dir[0])), col)
    head_c = hb + hd * 11
    cv.ellipse(head_c, (14.5, 7.5), math.degrees(math.atan2(hd[1], hd[0])), coat)
    cv.ellipse(hb + hd * 23, (4.5, 4.0), 0, (44, 38, 36))
    cv.ellipse(head_c + np.array([1.0, -4.0]) + hd * -1, (1.8, 1.6), 0, (20, 18, 18))
    cv.line(head_c + hd * 4 + (-2, -5), head_c + hd * 4 + (2, -2.5), 1.8, ind.mark)  # facial chevron
    if ind.sex == "male":
        for dx, col in ((3.0, (52, 46, 40)), (-1.0, (40, 36, 32))):
            horn = np.array([hb + (dx, -2), hb + (dx - 5, -15), hb + (dx + 3, -28), hb + (dx - 1, -38)])
            cv.ribbon(horn, [3.6, 3.0, 2.2, 1.2], col)
            cv.ribbon(horn[2:], [2.2, 1.2], (214, 200, 150))

    # near-side legs
    _leg(cv, (cx - 0.63 * a, cy + 0.5 * b), (cx - 0.64 * a - st * 0.5, ground - 28),
         (cx - 0.66 * a - st, ground - 3), [14, 10, 7, 5.4, 4.5], coat, ind.leg, hoof)
    _leg(cv, (cx + 0.62 * a, cy + 0.35 * b), (cx + 0.78 * a + st * 0.3 + 3, ground - 25),
         (cx + 0.7 * a + st * 0.6, ground - 3), [22, 13, 7, 5.4, 4.5], coat, ind.leg, hoof)

    rgb = cv.rgb.astype(np.float32) / 255.0
    alpha = cv.alpha.astype(np.float32) / 255.0
    # fur: a fixed low-frequency mottling and grain per individual and flank, plus rounded shading
    fr = np.random.default_rng([ind.fur_seed, VIEWPOINTS.index(viewpoint)])
    fur = 1.0 + 0.06 * _noise_field(fr, H, W, 18 * f.k) + 0.035 * _noise_field(fr, H, W, 1.5 * f.k)
    top, bottom = f.pts([(0, cy - b)])[0, 1], f.pts([(0, ground)])[0, 1]
    ys = np.arange(H, dtype=np.float32)[:, None]
    vert = 1.1 - 0.3 * np.clip((ys - top) / (bottom - top), 0, 1)
    rim = 0.72 + 0.28 * cv2.GaussianBlur(alpha, (0, 0), 4 * f.k)
    rgb *= (fur * vert * rim)[..., None]
    rgb = np.clip(rgb, 0, alpha[..., None])
    if viewpoint == "right":
        # the right flank faces the other way; its pattern is its own, so this is no mirrored photo
        rgb, alpha, pat = rgb[:, ::-1], alpha[:, ::-1], pat[:, ::-1]
    rgba = np.ascontiguousarray(np.dstack([rgb, alpha]))
    down = lambda x: cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)  # noqa: E731
    return down(rgba), down(np.ascontiguousarray(pat).astype(np.float32) / 255.0)


@functools.lru_cache(maxsize=256)
def _layer(ind: Individual, viewpoint: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(premultiplied RGBA float32, pattern mask) of the canonical view, drawn once per flank and size."""
    rgba, pat = _draw_animal(ind, viewpoint, size)
    for arr in (rgba, pat):
        arr.flags.writeable = False
    return rgba, pat


def _size(size) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be (height, width) of at least 16 pixels, not {size}")
    return h, w


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_canonical(ind: Individual, viewpoint: str = "left", size=DEFAULT_SIZE) -> np.ndarray:
    """HxWx3 uint8 RGB: the clean side view on a plain background (head left for `left`, right for `right`)."""
    _check_viewpoint(viewpoint)
    rgba, _ = _layer(ind, viewpoint, _size(size))
    return _to_uint8(rgba[..., :3] + (1.0 - rgba[..., 3:]) * np.array(_PLAIN_BG, np.float32))


def pattern_mask(ind: Individual, viewpoint: str = "left", size=DEFAULT_SIZE) -> np.ndarray:
    """HxW float32 in [0,1]: where the stripes and spots are in the canonical view (for tests and checks)."""
    _check_viewpoint(viewpoint)
    return np.array(_layer(ind, viewpoint, _size(size))[1])


def body_box(ind: Individual, viewpoint: str = "left", size=DEFAULT_SIZE) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the patterned body in the canonical view, in pixels."""
    _check_viewpoint(viewpoint)
    h, w = _size(size)
    g = _body_geometry(ind)
    f = _Frame.of((h, w))
    p = f.pts([(g["cx"] - 1.05 * g["a"], g["cy"] - 1.05 * g["b"]), (g["cx"] + 1.05 * g["a"], g["cy"] + 1.05 * g["b"])])
    x0, x1 = p[0, 0], p[1, 0]
    if viewpoint == "right":
        x0, x1 = w - x1, w - x0
    return float(x0), float(p[0, 1]), float(x1), float(p[1, 1])


# ---------------------------------------------------------------------------------------------
# Photos

_SKY = ((96, 106, 70), (116, 120, 84), (76, 86, 56), (142, 146, 116), (126, 134, 120))
_GROUND = ((172, 152, 116), (152, 134, 102), (124, 112, 82), (188, 172, 142), (110, 104, 72))
_LEAF = ((70, 96, 44), (92, 110, 52), (56, 74, 36), (118, 126, 66), (84, 84, 48))
_BARK = ((84, 74, 64), (104, 96, 88), (66, 58, 52), (128, 118, 104))
_GRASS = ((196, 180, 120), (166, 150, 92), (120, 130, 70), (210, 196, 150), (140, 120, 80))


def _pick(rng: np.random.Generator, palette, jitter: float = 8.0) -> tuple[int, int, int]:
    c = np.array(palette[int(rng.integers(len(palette)))], float) + rng.normal(0, jitter, 3)
    return tuple(int(x) for x in np.clip(c, 0, 255))


def _grass(img: np.ndarray, rng: np.random.Generator, n: int, y_lo: float, y_hi: float, k: float) -> None:
    """Grass blades, drawn a colour group at a time (one cv2 call per group keeps a photo fast)."""
    if n <= 0:
        return
    x, y = rng.uniform(0, img.shape[1], n), rng.uniform(y_lo, y_hi, n)
    ln = rng.uniform(5, 18, n) * k
    ang = np.radians(rng.uniform(-35, 35, n))
    seg = np.stack([x, y, x + ln * np.sin(ang), y - ln * np.cos(ang)], axis=1)
    seg = np.round(seg * (1 << _SHIFT)).astype(np.int32).reshape(n, 2, 2)
    groups = rng.integers(0, 2 * len(_GRASS), n)
    for gi in range(2 * len(_GRASS)):
        sel = groups == gi
        if sel.any():
            col = _pick(rng, (_GRASS[gi // 2],), 12)
            thick = max(1, int(round((0.8 + gi % 2 * 0.5) * k)))
            cv2.polylines(img, list(seg[sel]), False, col, thick, cv2.LINE_AA, _SHIFT)


def _foliage(img: np.ndarray, rng: np.random.Generator, n_clumps: int, y_max: float, k: float) -> None:
    """Leafy clumps: clusters of small ellipses around a few canopy centres."""
    h, w = img.shape[:2]
    for _ in range(n_clumps):
        c = np.array([rng.uniform(-0.05, 1.05) * w, rng.uniform(-0.1 * h, y_max)])
        rad = rng.uniform(8, 28) * k
        base = _pick(rng, _LEAF, 10)
        m = int(rng.integers(6, 20))
        r = rad * np.sqrt(rng.random(m))
        a = rng.uniform(0, 2 * np.pi, m)
        pts = c + np.stack([1.4 * r * np.cos(a), r * np.sin(a)], axis=1)
        axes = rng.uniform([2.0, 1.2], [6.0, 3.5], (m, 2)) * k
        angles = rng.uniform(0, 180, m)
        shades = rng.uniform(0.75, 1.2, m)
        for p, ax, an, sh in zip(pts, axes, angles, shades):
            cv2.ellipse(img, _fx(*p), _fx(*ax), float(an), 0, 360, _shade(base, sh), -1, cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator, size: tuple[int, int], d: float) -> np.ndarray:
    """Savanna clutter: vegetation over ground, trees, leaves, rocks, grass. Float32 RGB in [0,1]."""
    h, w = size
    k = min(w / _REF_W, h / _REF_H)
    t = min(d, 1.0)
    sky, gnd = np.array(_pick(rng, _SKY), np.float32), np.array(_pick(rng, _GROUND), np.float32)
    horizon = rng.uniform(0.25, 0.6) * h
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    mix = 1.0 / (1.0 + np.exp(-(ys - horizon) / (0.04 * h)))
    img = (sky * (1 - mix) + gnd * mix) * np.ones((1, w, 1), np.float32)
    img *= (1.0 + 0.22 * _noise_field(rng, h, w, 30 * k))[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)

    _foliage(img, rng, int(rng.poisson(4 * d)), horizon, k)
    for _ in range(int(rng.poisson(1.6 * d))):  # trees, with a branch or two
        x = rng.uniform(0, w)
        y1 = rng.uniform(horizon, h * 0.95)
        wd = rng.uniform(4, 12) * k
        col = _pick(rng, _BARK)
        trunk = np.array([[x, -5], [x + rng.normal(0, 6 * k), (y1 - 5) / 2], [x + rng.normal(0, 6 * k), y1]])
        cv2.fillPoly(img, [_fixed(_ribbon(trunk, [wd * 0.8, wd, wd * 1.2]))], col, cv2.LINE_AA, _SHIFT)
        for _ in range(int(rng.integers(0, 3))):
            yb = rng.uniform(0, y1 * 0.7)
            ang = rng.uniform(0.3, 1.2)
            ln = rng.uniform(15, 45) * k * (1 if rng.random() < 0.5 else -1)
            br = np.array([[x, yb], [x + ln * math.cos(ang), yb - abs(ln) * math.sin(ang)]])
            cv2.fillPoly(img, [_fixed(_ribbon(br, [wd * 0.5, wd * 0.2]))], col, cv2.LINE_AA, _SHIFT)
    _foliage(img, rng, int(rng.poisson(1.5 * d)), horizon + 0.1 * h, k)
    for _ in range(int(rng.poisson(2.0 * d))):  # rocks
        c = np.array([rng.uniform(0, w), rng.uniform(horizon, h)])
        ax = np.array([rng.uniform(8, 26), rng.uniform(4, 12)]) * k
        grey = rng.uniform(95, 175)
        col = tuple(int(grey + v) for v in rng.normal(0, 6, 3))
        cv2.ellipse(img, _fx(*c), _fx(*ax), 0, 180, 360, col, -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(img, _fx(*(c - (0, ax[1] * 0.4))), _fx(*(ax / 2)), 0, 200, 340, _shade(col, 1.18), -1,
                    cv2.LINE_AA, _SHIFT)
    _grass(img, rng, int(rng.poisson(220 * d)), horizon, h * 1.05, k)

    out = img.astype(np.float32) / 255.0
    # the background is out of focus behind the animal
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.6) * k)
    out *= (1.0 + 0.05 * _noise_field(rng, h, w, 2.5 * k))[..., None]
    return np.array(_PLAIN_BG, np.float32) * (1 - t) + out * t


def _view_homography(rng: np.random.Generator, size: tuple[int, int], d: float) -> np.ndarray:
    """Canonical -> photo: keystone and corner jitter (out-of-plane view), then scale, rotation, shift."""
    h, w = size
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    # keystone: one end of the animal nearer the camera looks taller than the other
    key = float(np.clip(rng.uniform(-0.12, 0.12) * d, -0.3, 0.3))
    dst = src.copy()
    dst[:, 1] += np.float32([-key, key, -key, key]) * h * 0.5  # TL, TR, BR, BL
    dst += rng.normal(0, 0.03 * d, (4, 2)).astype(np.float32) * np.float32([w, h])
    P = cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    s = float(np.exp(np.clip(rng.normal(-0.05 * d, 0.14 * d), -0.6, 0.35)))
    th = math.radians(rng.uniform(-15, 15) * min(d, 2.0))
    t = np.array([rng.uniform(-0.07, 0.07) * w, rng.uniform(-0.05, 0.05) * h]) * d
    c = np.array([w / 2, h / 2])
    R = np.array([[s * math.cos(th), -s * math.sin(th), 0], [s * math.sin(th), s * math.cos(th), 0], [0, 0, 1]])
    T1 = np.array([[1, 0, -c[0]], [0, 1, -c[1]], [0, 0, 1]])
    T2 = np.array([[1, 0, c[0] + t[0]], [0, 1, c[1] + t[1]], [0, 0, 1]])
    return T2 @ R @ T1 @ P


def _occlude(img: np.ndarray, rng: np.random.Generator, box: np.ndarray, d: float, k: float) -> None:
    """A branch across the body or a bush in front of part of it, drawn in place on uint8 RGB."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if rng.random() < 0.5:
        # branch: enters from above or a side and crosses the body somewhere
        p_mid = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        ang = rng.uniform(0.2, math.pi - 0.2)
        dirv = np.array([math.cos(ang), math.sin(ang)])
        ln = rng.uniform(0.7, 1.4) * max(bw, bh) * min(1.0, 0.5 + 0.5 * d)
        bend = np.array([-dirv[1], dirv[0]]) * rng.normal(0, 6 * k)
        line = np.array([p_mid - dirv * ln / 2, p_mid + bend, p_mid + dirv * ln / 2])
        col = _pick(rng, _BARK)
        wd = rng.uniform(2.5, 5.5) * k
        cv2.fillPoly(img, [_fixed(_ribbon(line, [wd * 1.2, wd, wd * 0.6]))], col, cv2.LINE_AA, _SHIFT)
        for _ in range(int(rng.integers(4, 14))):
            tpos = rng.uniform(0, 1)
            p = (line[0] * (1 - tpos) + line[2] * tpos) + rng.normal(0, 5 * k, 2)
            ax = (rng.uniform(4, 9) * k, rng.uniform(1.8, 3.5) * k)
            cv2.ellipse(img, _fx(*p), _fx(*ax), rng.uniform(0, 180), 0, 360, _pick(rng, _LEAF, 14), -1,
                        cv2.LINE_AA, _SHIFT)
    else:
        # bush: rises from the ground in front of the belly, chest or rump
        cxb = rng.uniform(x0 - 0.1 * bw, x1 + 0.1 * bw)
        cyb = rng.uniform(y1 - 0.15 * bh, y1 + 0.4 * bh)
        rad = rng.uniform(0.25, 0.5) * bh * min(1.5, 0.5 + 0.5 * d)
        for _ in range(int(rng.integers(18, 45))):
            r = rad * math.sqrt(rng.random())
            a = rng.uniform(0, 2 * math.pi)
            p = (cxb + 1.3 * r * math.cos(a), cyb + r * math.sin(a))
            rr = rng.uniform(2.5, 7) * k
            cv2.circle(img, _fx(*p), _fx(rr)[0], _pick(rng, _LEAF, 14), -1, cv2.LINE_AA, _SHIFT)


def _light(u8: np.ndarray, rng: np.random.Generator, d: float) -> np.ndarray:
    """Gamma, gain, a light gradient, maybe dappled shade, a colour cast: uint8 in, float32 [0,1] out."""
    h, w = u8.shape[:2]
    gamma = float(np.exp(np.clip(rng.normal(0, 0.22 * d), -0.8, 0.8)))
    lut = (np.linspace(0, 1, 256, dtype=np.float32) ** gamma).astype(np.float32)
    gain = float(np.exp(np.clip(rng.normal(0, 0.18 * d), -0.8, 0.6)))
    phi = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 0.4) * d
    xs = (np.arange(w, dtype=np.float32)[None, :] / w - 0.5)
    ys = (np.arange(h, dtype=np.float32)[:, None] / h - 0.5)
    light = np.clip(1.0 + amp * (math.cos(phi) * xs + math.sin(phi) * ys), 0.2, 2.0)
    if rng.random() < min(1.0, 0.5 * d):  # dappled shade of a tree over the whole scene
        shade = np.clip(_noise_field(rng, h, w, 22 * min(w / _REF_W, h / _REF_H)) * 2.0, 0, 1)
        light = light * (1.0 - rng.uniform(0.15, 0.4) * min(d, 1.5) * cv2.GaussianBlur(shade, (0, 0), 2.0))
    cast = np.exp(rng.normal(0, 0.03 * d, 3)).astype(np.float32)
    out = cv2.LUT(u8, lut) * ((gain * light)[..., None] * cast)
    return np.clip(out, 0, 1, out=out)


def render_photo(ind: Individual, rng: np.random.Generator, viewpoint: str = "left", size=DEFAULT_SIZE,
                 difficulty: float = 1.0) -> np.ndarray:
    """HxWx3 uint8 RGB: one photo of `ind`'s flank, varied by `rng`; difficulty 0 is the canonical view.

    Never mirrored. JPEG compression is applied when the photo is saved (see make_dataset)."""
    _check_viewpoint(viewpoint)
    size = _size(size)
    d = float(difficulty)
    if d < 0:
        raise ValueError(f"difficulty must be >= 0, not {difficulty}")
    if d == 0:
        return render_canonical(ind, viewpoint, size)
    h, w = size
    k = min(w / _REF_W, h / _REF_H)
    rgba, _ = _layer(ind, viewpoint, size)
    Hm = _view_homography(rng, size, d)
    rgba_w = cv2.warpPerspective(rgba, Hm, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha_w = rgba_w[..., 3]
    bg = _background(rng, size, d)
    img = rgba_w[..., :3] + (1.0 - alpha_w[..., None]) * bg

    x0, y0, x1, y1 = body_box(ind, viewpoint, size)
    corners = cv2.perspectiveTransform(np.float32([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]]), Hm)[0]
    box = np.array([*corners.min(0), *corners.max(0)])
    u8 = _to_uint8(img)
    # grass in front of the hooves, then maybe a branch or bush over the body
    ys_animal = np.nonzero(alpha_w.max(axis=1) > 0.5)[0]
    ground = float(ys_animal.max()) if len(ys_animal) else h * 0.9
    _grass(u8, rng, int(rng.poisson(35 * d)), ground - 12 * k, ground + 10 * k, k)
    if rng.random() < min(0.85, 0.55 * d):
        _occlude(u8, rng, box, d, k)
    img = _light(u8, rng, d)

    sigma = rng.uniform(0, 0.8) * d * k
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.5, 4.0) * d / 255.0)
    return _to_uint8(img)


def jpeg_quality(rng: np.random.Generator, difficulty: float) -> int:
    """JPEG quality for a saved photo: 95 for clean views, down to about 70 at difficulty 1."""
    return int(np.clip(round(95 - rng.uniform(0, 25) * difficulty), 35, 95))


# ---------------------------------------------------------------------------------------------
# Data sets


def individual_id(index: int) -> str:
    return f"ind{index:03d}"


def individual_seed(seed: int, index: int) -> int:
    """Seed of the index-th individual of a data set: adding individuals does not change the others."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _write_image(path: Path, rgb: np.ndarray, image_format: str, quality: int) -> None:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f"could not write {path}")


def make_dataset(out_dir: Path, n_individuals: int = 30, photos_per_individual: int = 6, seed: int = 0,
                 size=DEFAULT_SIZE, viewpoints: tuple[str, ...] = ("left",), difficulty: float = 1.0,
                 image_format: str = "jpg") -> Path:
    """Write out_dir/images/<id>/<k>.<ext> and out_dir/catalog.csv; return the catalog path.

    Each individual gets `photos_per_individual` photos of each viewpoint, numbered k = 0, 1, ...
    across viewpoints. The catalog has `image,individual_id` (paths relative to out_dir), plus
    `viewpoint` when there is more than one viewpoint."""
    out_dir = Path(out_dir)
    image_format = image_format.lower().lstrip(".").replace("jpeg", "jpg")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, not {image_format!r}")
    for v in viewpoints:
        _check_viewpoint(v)
    if not viewpoints or len(set(viewpoints)) != len(viewpoints):
        raise ValueError(f"viewpoints must be distinct and non-empty, not {viewpoints}")
    size = _size(size)
    rows = []
    for i in range(n_individuals):
        ind = make_individual(individual_id(i), individual_seed(seed, i))
        folder = out_dir / "images" / ind.id
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, 1]))
        k = 0
        for v in viewpoints:
            for _ in range(photos_per_individual):
                img = render_photo(ind, rng, v, size, difficulty)
                name = f"{k}.{image_format}"
                _write_image(folder / name, img, image_format, jpeg_quality(rng, difficulty))
                rows.append((f"images/{ind.id}/{name}", ind.id, v))
                k += 1
    catalog = out_dir / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        wr = csv.writer(f)
        multi = len(viewpoints) > 1
        wr.writerow(["image", "individual_id"] + (["viewpoint"] if multi else []))
        wr.writerows(r if multi else r[:2] for r in rows)
    log.info("wrote %d synthetic photos of %d individuals to %s", len(rows), n_individuals, out_dir)
    return catalog


def split_open_set(catalog_csv: Path, out_dir: Path, n_unseen: int, queries_per_individual: int = 1,
                   seed: int = 0, images_dir: Path | None = None) -> tuple[Path, Path, Path]:
    """Open-set split of a catalog (gallery.csv, queries/, truth.csv).

    `n_unseen` individuals leave the gallery entirely; up to `queries_per_individual` of their
    photos become queries with truth `new_individual`. Every other individual gives up to
    `queries_per_individual` photos as queries while keeping at least one gallery photo of each
    query's viewpoint (an individual with a single photo stays whole in the gallery).
    Writes only under out_dir: gallery.csv (absolute image paths: the photos stay where they are,
    in `images_dir`, default the catalog's folder), the queries copied to out_dir/queries/q00000.<ext>
    (anonymised), and out_dir/truth.csv
    (`image,individual_id`, plus `viewpoint` and `bbox` where the catalog has them). Seeded, deterministic.
    Returns (gallery.csv, queries_dir, truth.csv)."""
    catalog_csv, out_dir = Path(catalog_csv), Path(out_dir)
    with open(catalog_csv, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "image" not in fields or "individual_id" not in fields:
        raise ValueError(f"{catalog_csv}: expected columns image,individual_id")
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[r["individual_id"]].append(r)
    ids = sorted(by_id)
    if not 0 <= n_unseen <= len(ids):
        raise ValueError(f"n_unseen must be between 0 and {len(ids)}, not {n_unseen}")
    rng = random.Random(seed)
    order = ids[:]
    rng.shuffle(order)
    unseen = set(order[:n_unseen])

    gallery, queries = [], []
    for i in ids:
        photos = sorted(by_id[i], key=lambda r: r["image"])
        rng.shuffle(photos)
        if i in unseen:
            queries += [(r, NEW_INDIVIDUAL) for r in photos[:queries_per_individual]]
            continue
        left = defaultdict(int)
        for r in photos:
            left[r.get("viewpoint", "")] += 1
        chosen = []
        for r in photos:
            vp = r.get("viewpoint", "")
            if len(chosen) < queries_per_individual and left[vp] > 1:
                chosen.append(r)
                left[vp] -= 1
        queries += [(r, i) for r in chosen]
        taken = {id(r) for r in chosen}
        gallery += sorted((r for r in photos if id(r) not in taken), key=lambda r: r["image"])
    rng.shuffle(queries)

    images_dir = Path(images_dir) if images_dir is not None else catalog_csv.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    gallery_csv = out_dir / "gallery.csv"
    with open(gallery_csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows({**r, "image": str((images_dir / r["image"]).resolve())} for r in gallery)
    qdir = out_dir / "queries"
    if qdir.exists():
        shutil.rmtree(qdir)  # a stale query from an earlier split would be scored without truth
    qdir.mkdir(parents=True)
    truth_csv = out_dir / "truth.csv"
    with open(truth_csv, "w", newline="") as f:
        wr = csv.writer(f)
        # the query's bbox too: matched and evaluated on the crop, as the gallery's photos are
        extra = [c for c in ("viewpoint", "bbox") if c in fields]
        wr.writerow(["image", "individual_id"] + extra)
        for k, (r, truth) in enumerate(queries):
            name = f"q{k:05d}{Path(r['image']).suffix.lower()}"
            shutil.copyfile(images_dir / r["image"], qdir / name)
            wr.writerow([name, truth] + [r[c] for c in extra])
    n_new = sum(t == NEW_INDIVIDUAL for _, t in queries)
    log.info("gallery %d photos of %d individuals; queries %d (%d new)", len(gallery),
             len({r["individual_id"] for r in gallery}), len(queries), n_new)
    return gallery_csv, qdir, truth_csv


