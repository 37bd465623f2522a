"""Image decoding converts band by band (bounded memory) with exactly the pixels of a whole-image conversion, for
every mode Pillow decodes to."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from samserve.vision import images


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_band_conversion_equals_whole_image_conversion(mode, monkeypatch):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8))
    image = source.quantize(7) if mode == "P" else source.convert(mode)
    monkeypatch.setattr(images, "BAND_PIXELS", 23 * 5)  # 5 rows per band: 8 bands, the last one partial
    banded = images._rgb_array(image)
    assert banded.shape == (37, 23, 3) and banded.dtype == np.uint8
    np.testing.assert_array_equal(banded, np.asarray(image.convert("RGB")))


def test_decoding_applies_exif_orientation_band_by_band(monkeypatch):
    monkeypatch.setattr(images, "BAND_PIXELS", 10)
    pixels = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    decoded = images.decode_image(buffer.getvalue(), 10**6)
    np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))


def _animated_webp(width: int, colors: list[tuple[int, int, int]]) -> bytes:
    """An animated WebP of 1 x 1 frames on a ``width`` x 1 canvas (the canvas size patched into the VP8X header:
    24 bits, width - 1, little-endian, 4 bytes after the flags' byte)."""
    frames = [Image.new("RGB", (1, 1), color) for color in colors]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    width_field = data.index(b"VP8X") + 12
    data[width_field : width_field + 3] = (width - 1).to_bytes(3, "little")
    return bytes(data)


@pytest.mark.timeout(10)  # a hang bound: linear decoding takes about 0.1 s, the quadratic one took 20 s
def test_widest_webp_canvas_decodes_in_time_linear_in_its_width():
    """Found by the fuzz tier: Pillow read this image's one 64 MB row in 64 KB blocks, each appended to the rest."""
    width = 1 << 24  # the largest canvas WebP declares
    data = _animated_webp(width, [(200, 10, 10), (10, 200, 10)])
    assert images.header_size(data) == (width, 1)
    decoded = images.decode_image(data, width)
    assert decoded.shape == (1, width, 3)
    np.testing.assert_array_equal(decoded[0, 0], (200, 10, 10))  # the first frame, drawn at the canvas's origin
