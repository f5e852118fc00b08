"""Decode a photo to RGB uint8, whatever the file holds.

EXIF orientation is applied; grayscale, palette, RGBA (composited on grey), CMYK and 16-bit
images are converted; an optional bbox crops before anything else. PIL decodes: torchvision's
decoders are not usable on every machine (see siamese/torchvision_schemas.py).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ImageError

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
    DCT, ~10x faster on a 24-megapixel photo) as long as the shorter side of the result (of its
    bbox crop) stays at least `min_side` pixels: for callers that shrink the photo to about that
    size anyway. `load_image_reduced` also says which full-resolution size the result stands for."""
    return load_image_reduced(path, bbox, min_side)[0]


def load_image_reduced(path: Path, bbox: tuple[int, int, int, int] | None = None,
                       min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(image, (h, w)): `load_image`'s result and the size it has at full resolution (equal to its
    shape unless the decoder reduced it), so that positions found on it map to the full photo:
    x_full = (x + 0.5) * w / image_width - 0.5."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF and truncation warnings become errors below
            with Image.open(path) as img:
                full = img.size  # (w, h) as stored, before the EXIF orientation
                if min_side and img.format == "JPEG":
                    _draft(img, bbox, min_side)
                img.load()
                stored = img.size
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
    H, W = arr.shape[:2]
    # the full-resolution size in the photo's displayed orientation (the EXIF one may swap the axes)
    FW, FH = full if (W, H) == stored else full[::-1]
    fx, fy = W / FW, H / FH  # 1 unless reduced
    if bbox is not None:
        x, y, w, h = bbox
        x0, y0, x1, y1 = max(0, x), max(0, y), min(FW, x + w), min(FH, y + h)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ImageError(f"{path}: bbox {bbox} lies outside the {FW}x{FH} image")
        arr = arr[round(y0 * fy):max(round(y1 * fy), round(y0 * fy) + 1), round(x0 * fx):max(round(x1 * fx), round(x0 * fx) + 1)]
        FW, FH = x1 - x0, y1 - y0
    if FH < 2 or FW < 2:
        raise ImageError(f"{path}: image is only {FW}x{FH} pixels")
    return np.ascontiguousarray(arr), (FH, FW)


def _draft(img: Image.Image, bbox, min_side: int) -> None:
    """Ask the JPEG decoder for the smallest of its reductions that keeps the shorter side (of the
    bbox crop) at `min_side` pixels or more; it keeps the full size when none does."""
    w, h = img.size
    short = min(w, h)
    if bbox is not None:
        W, H = (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # as displayed
        x, y, bw, bh = bbox
        short = max(1, min(min(W, x + bw) - max(0, x), min(H, y + bh) - max(0, y)))
    scale = min_side / short
    if scale <= 0.5:  # half the size or less: one of 1/2, 1/4, 1/8 may do
        img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
