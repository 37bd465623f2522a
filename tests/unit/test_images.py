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
