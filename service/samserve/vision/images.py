"""Image bytes -> RGB pixels as a person sees them (EXIF orientation applied), with limits; content ids."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from samserve.core.errors import InvalidArgument

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
BAND_PIXELS = 4_000_000
"""Pixels converted to the output array at a time: peak memory of a decode is Pillow's image (4 bytes per pixel)
plus the result (3), not the several whole-image copies that ``np.asarray(image.convert("RGB"))`` makes (a 64 MP
JPEG: +0.45 GB instead of +1.1 GB)."""
ROW_BYTES_PER_PIXEL = 16
"""The widest pixel Pillow's row decoders read (4 channels of 32 bits): a decode reads at least this times the width
per block, so every block completes a row. (Pillow appends each block to the unconsumed rest of the last; with rows
longer than its 64 KB block, a wide image costs time quadratic in its width: an animated WebP of 16777216 x 1
took 20 s.)"""


IMAGE_ID = re.compile(r"[0-9a-f]{64}")
"""What :func:`image_id` returns: the hex SHA-256 of the bytes."""


def image_id(data: bytes) -> str:
    """Content address of an encoded image: hex SHA-256 of its BYTES (re-encoding the same pixels changes it)."""
    return hashlib.sha256(data).hexdigest()


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of encoded image bytes (nothing decoded), before EXIF orientation;
    (0, 0) when there is no readable header."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image reports it with the reason
        return 0, 0
    return max(0, width), max(0, height)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes to H x W x 3 uint8 RGB, EXIF orientation applied.

    Raises InvalidArgument for undecodable data (empty bytes included), other formats, and images over ``max_pixels``
    (checked from the header, before any pixel is decoded: decompression bombs never allocate).
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise InvalidArgument(f"unsupported image format {image.format}; use JPEG, PNG, WebP, BMP or TIFF")
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidArgument(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise InvalidArgument(f"image has {width}x{height} pixels, over the limit of {max_pixels}")
        image.decodermaxblock = max(image.decodermaxblock, width * ROW_BYTES_PER_PIXEL)
        ImageOps.exif_transpose(image, in_place=True)  # one whole image held at a time, never a copy
        return _rgb_array(image)
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = "not a supported image format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise InvalidArgument(f"undecodable image: {reason}") from None


def _rgb_array(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 RGB of ``image`` (any mode), converted band by band (:data:`BAND_PIXELS`) into one array."""
    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        out[top : top + band.height] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
    return out
