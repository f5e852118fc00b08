"""Decode a photo to RGB uint8, whatever the file holds.

EXIF orientation is applied; grayscale, palette, RGBA (composited on grey), CMYK and 16-bit
images are converted; an optional bbox crops before anything else. PIL decodes: torchvision's
decoders are not usable on every machine (see siamese/torchvision_schemas.py).
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ImageError

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = 400_000_000  # camera-trap mosaics and drone shots can be large


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float: stretch the actual range to 8 bits rather than clip at 255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.percentile(arr, (0.1, 99.9)) if arr.size else (0.0, 1.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        grey = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return np.asarray(Image.alpha_composite(grey, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(path: Path, bbox: tuple[int, int, int, int] | None = None, min_side: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB. Raises ImageError (naming the file) when it cannot be decoded.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's scaling in the
    DCT: 6-8x faster to decode on a 24-megapixel photo) as long as the shorter side of the result
    (of its bbox crop) stays at least `min_side` pixels: for callers that shrink the photo to about
    that size anyway. `load_image_reduced` also says where the result lies in the full photo."""
    return load_image_reduced(path, bbox, min_side)[0]


@dataclass(frozen=True)
class Reduction:
    """Where a decoded image lies in the full-resolution photo (or its bbox crop): pixel (x, y) of
    the image is at (x * scale + offset_x, y * scale + offset_y) of the photo, whose size is `size`."""

    size: tuple[int, int]  # (h, w) of the full-resolution photo or crop
    scale: int = 1  # photo pixels per decoded pixel: 1, 2, 4 or 8
    offset: tuple[float, float] = (0.0, 0.0)  # (x, y)

    def to_full(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) positions in the decoded image -> in the full photo."""
        return np.asarray(xy, np.float64) * self.scale + np.asarray(self.offset)


def load_image_reduced(path: Path, bbox: tuple[int, int, int, int] | None = None,
                       min_side: int | None = None) -> tuple[np.ndarray, Reduction]:
    """`load_image`'s result and its `Reduction`: where positions found on it lie in the full photo."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF and truncation warnings become errors below
            with Image.open(path) as img:
                # the full size as displayed: EXIF orientations 5-8 turn the stored photo by 90 degrees
                orientation = img.getexif().get(0x0112, 1)
                swap = orientation in (5, 6, 7, 8)
                W, H = img.size[::-1] if swap else img.size
                stored, scale = img.size, 1
                if min_side and img.format in ("JPEG", "MPO"):  # MPO: a JPEG with preview images
                    scale = _draft(img, (W, H), bbox, min_side)
                # a side that is no multiple of the reduction ends in a partly empty block, at the
                # start of a displayed axis that the orientation reverses: pixels shift by the excess
                excess = [math.ceil(n / scale) * scale - n for n in stored]
                excess = excess[::-1] if swap else excess
                base = [-e if flip else 0 for e, flip in zip(excess, _REVERSED.get(orientation, (False, False)))]
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = _to_rgb_array(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # an OSError with an errno comes from the system (EIO, EACCES, a network share gone): it may
        # pass; PIL's own errors (truncated, unrecognised data) carry none and will not
        transient = isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) and e.errno is not None
        raise ImageError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})",
                         permanent=not transient) from None
    # decoded pixel i covers photo pixels [i * scale + base, (i + 1) * scale + base) per axis
    c = (scale - 1) / 2  # its centre, from the start of its block
    x0 = y0 = 0
    i0 = j0 = 0
    if bbox is not None:
        x0, y0, x1, y1 = _clip(bbox, W, H)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ImageError(f"{path}: bbox {bbox} lies outside the {W}x{H} image")
        _warn_partly_outside(path, bbox, (x1 - x0) * (y1 - y0), (W, H), swap)
        # the decoded pixels wholly inside the box
        i0, j0 = -(-(x0 - base[0]) // scale), -(-(y0 - base[1]) // scale)
        i1, j1 = max((x1 - base[0]) // scale, i0 + 1), max((y1 - base[1]) // scale, j0 + 1)
        arr = arr[j0:j1, i0:i1]
        W, H = x1 - x0, y1 - y0
    offset = (i0 * scale + base[0] + c - x0, j0 * scale + base[1] + c - y0)
    if H < 2 or W < 2:
        raise ImageError(f"{path}: image is only {W}x{H} pixels")
    _warn_small(path, bbox, W, H)
    return np.ascontiguousarray(arr), Reduction((H, W), scale, offset)


# the displayed axes (x, y) that each EXIF orientation reverses (ImageOps.exif_transpose)
_REVERSED = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
             8: (False, True)}


_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_partly_outside(path: Path, bbox, inside: int, size: tuple[int, int], turned: bool) -> None:
    """Once per photo: a bbox that reaches well past the photo (a detector's box measured on the
    photo before its EXIF rotation, or a typing error) is cropped to the part inside, with a warning."""
    x, y, w, h = bbox
    if inside >= 0.9 * w * h:
        return
    with _WARNED_LOCK:
        if (path, tuple(bbox)) in _WARNED:
            return
        _WARNED.add((path, tuple(bbox)))
    W, H = size
    hint = ""
    if turned and x + w <= H and y + h <= W:
        hint = f"; it would fit the photo as stored ({H}x{W}, before its EXIF rotation): was it measured there?"
    log.warning("%s: bbox %s reaches past the %dx%d photo (as displayed, EXIF orientation applied): %d%% of it "
                "is inside, and only that part is used%s", path, tuple(bbox), W, H, round(100 * inside / (w * h)), hint)


# below this many pixels on its shorter side a photo (or its box) is a thumbnail: read, with a warning
SMALL_SIDE = 64


def _warn_small(path: Path, bbox, W: int, H: int) -> None:
    """Once per photo: one too small to show a coat pattern is read, but its answers mean little."""
    if min(W, H) >= SMALL_SIDE:
        return
    with _WARNED_LOCK:
        if (path, bbox, "small") in _WARNED:
            return
        _WARNED.add((path, bbox, "small"))
    log.warning("%s: only %dx%d pixels%s (a thumbnail?): too few to tell animals apart by, so its answers mean "
                "little", path, W, H, " in its bbox" if bbox is not None else "")


def _clip(bbox, W: int, H: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a catalog bbox (x, y, w, h) inside a W x H photo."""
    x, y, w, h = bbox
    return max(0, x), max(0, y), min(W, x + w), min(H, y + h)


def _draft(img: Image.Image, size: tuple[int, int], bbox, min_side: int) -> int:
    """Ask the JPEG decoder for the smallest of its reductions that keeps the shorter side (of the
    bbox crop; `size` is the photo's (w, h) as displayed) at `min_side` pixels or more. Returns the
    reduction (1: none)."""
    if bbox is None:
        short = min(size)
    else:
        x0, y0, x1, y1 = _clip(bbox, *size)
        short = max(1, min(x1 - x0, y1 - y0))
    want = min_side / short
    if want > 0.5:  # not even half the size
        return 1
    w, h = img.size
    drafted = img.draft(img.mode, (math.ceil(w * want), math.ceil(h * want)))
    return round(w / drafted[1][2]) if drafted else 1
