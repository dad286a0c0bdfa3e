"""Reading and validating input images: one place for what the toolkit accepts.

Accepted: anything PIL decodes, converted to 8-bit RGB (palette, grayscale, CMYK; alpha is composited
on white; 16-bit and float images are rescaled to 8 bits); files are turned upright by their EXIF
orientation, as viewers show them. Refused with a one-line ``ValueError``: unreadable, corrupt or
truncated files, zero-size images, images over ``MAX_PIXELS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # 16.8 MP: far beyond any FLUX resolution; larger inputs are refused
MIN_SIDE = 8


def check_size(img: Image.Image, what: str = "image", max_pixels: int = MAX_PIXELS) -> None:
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ValueError(f"{what} is {w}x{h}: both sides must be at least {MIN_SIDE} pixels")
    if w * h > max_pixels:
        raise ValueError(f"{what} is {w}x{h} ({w * h / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit; "
                         "downscale it first")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            hi = 1.0 if a.max() <= 1.0 else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, validate and fully decode an image file as 8-bit RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a known signature, then a broken header
        raise ValueError(f"{path} is corrupt or truncated ({e})") from None
    check_size(img, str(path), max_pixels)  # header only: refuse huge images before decoding them
    try:
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (PIL's decoders raise many types on broken data; all are bad input)
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def as_rgb_image(image, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Accept a path, PIL image or HxWx3 uint8 array; return a validated RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"{what} array must be HxWx3 (or 4) uint8, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
    check_size(image, what, max_pixels)
    return to_rgb(image)
