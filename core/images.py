"""Decode a photo to RGB uint8, whatever the file holds.

EXIF orientation is applied; grayscale, palette, RGBA (composited on grey), CMYK and 16-bit
images are converted; an optional bbox crops before anything else. PIL decodes: torchvision's
decoders are not usable on every machine (see siamese/torchvision_schemas.py).
"""
from __future__ import annotations

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


def load_image(path: Path, bbox: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB. Raises ImageError (naming the file) when it cannot be decoded."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF and truncation warnings become errors below
            with Image.open(path) as img:
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
    if bbox is not None:
        x, y, w, h = bbox
        H, W = arr.shape[:2]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ImageError(f"{path}: bbox {bbox} lies outside the {W}x{H} image")
        arr = arr[y0:y1, x0:x1]
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"{path}: image is only {arr.shape[1]}x{arr.shape[0]} pixels")
    return np.ascontiguousarray(arr)
