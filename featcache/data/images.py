"""Open and decode one image file safely: a regular file, within a pixel budget, upright, RGB.

Everything here is part of how pixels are made from bytes, so :data:`DECODE_RECIPE` is
recorded in each feature space's provenance: decoding differently makes a new space.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..files import NotRegularFile, open_regular

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "RESIZE_SHORT_SIDE",
    "DECODE_RECIPE",
    "NotRegularFile",
    "ImageTooLarge",
    "is_image_name",
    "open_regular",
    "check_size",
    "decode_bytes",
    "load_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

MAX_PIXELS = 80_000_000
"""Largest image decoded (width x height), about 240 MB as 8-bit RGB."""

RESIZE_SHORT_SIDE = 256
MAX_RESIZED_PIXELS = 64_000_000
"""Largest image once its short side is resized to :data:`RESIZE_SHORT_SIDE` (the usual
ImageNet resize): a 1x70000 strip is tiny on disk but would become 256x17,920,000."""

DECODE_RECIPE = {
    "decoder": "PIL",
    "exif_transpose": True,
    "alpha": "white",
    "high_bit_depth": "scaled_to_8bit",
    "max_pixels": MAX_PIXELS,
    "max_resized_pixels": MAX_RESIZED_PIXELS,
    "resize_short_side": RESIZE_SHORT_SIDE,
}

# A truncated JPEG is a bad file, not a grey-bottomed image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageTooLarge(ValueError):
    """An image whose decoded or resized size would exceed the pixel budget."""


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_size(width: int, height: int) -> None:
    """Refuse an image whose decode or short-side resize would exceed the pixel budget."""
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise ImageTooLarge(
            f"image too large: {width}x{height} is {pixels / 1e6:.0f} Mpixel, over the budget of "
            f"{MAX_PIXELS / 1e6:.0f} Mpixel"
        )
    short, long = sorted((width, height))
    resized = RESIZE_SHORT_SIDE * RESIZE_SHORT_SIDE * long / max(short, 1)
    if resized > MAX_RESIZED_PIXELS:
        raise ImageTooLarge(
            f"extreme aspect ratio: {width}x{height} resized to a short side of {RESIZE_SHORT_SIDE} would be "
            f"{resized / 1e6:.0f} Mpixel, over the budget of {MAX_RESIZED_PIXELS / 1e6:.0f} Mpixel"
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale modes become 8-bit 'L' by their actual range, not by clipping."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return img.convert("L")
    top = 65535.0 if arr.dtype in (np.uint16, np.int32) and arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8), "L")


def _decode(img: Image.Image) -> Image.Image:
    """Check the size from the header, decode, turn upright by EXIF, and convert to RGB."""
    check_size(*img.size)
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_bytes(data: bytes) -> Image.Image:
    """Decode an image from bytes already read (the bytes that were hashed) as RGB.

    Raises ``OSError``/``ValueError`` (Pillow's, or :class:`ImageTooLarge`) for bytes that
    are not a readable image within the pixel budget.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's own text names the in-memory buffer (<_io.BytesIO object at 0x...>)
        raise UnidentifiedImageError("not an image in a format Pillow reads (the file's first bytes match none)") from None
    with img:
        return _decode(img)


def load_rgb(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Decode an image file (or an open binary file) fully and return it as RGB, upright.

    Greyscale, 16-bit, palette, CMYK and images with transparency are converted;
    transparency is composited on white so transparent pixels do not carry garbage. A path
    that is not a regular file raises :class:`NotRegularFile` without being read.
    """
    if hasattr(path, "read"):
        with Image.open(path) as img:
            return _decode(img)
    with open_regular(path) as f, Image.open(f) as img:
        return _decode(img)
