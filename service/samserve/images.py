"""Image bytes -> RGB pixels as a person sees them (EXIF orientation applied), with limits; content ids."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from samserve.errors import InvalidArgument

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})


def image_id(data: bytes) -> str:
    """Content address of an encoded image: hex SHA-256 of its BYTES (re-encoding the same pixels changes it)."""
    return hashlib.sha256(data).hexdigest()


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
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("RGB"))
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = "not a supported image format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise InvalidArgument(f"undecodable image: {reason}") from None
