"""Seeded synthetic images for tests and benchmarks (no downloads anywhere), and their PNG bytes."""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """H x W x 3 uint8 RGB: a smooth gradient with a few filled ellipses and mild noise (seeded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1), np.full_like(xx, 96.0)], axis=-1
    )
    for _ in range(4):
        color = rng.integers(0, 256, size=3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.1, 0.4) * height, rng.uniform(0.1, 0.4) * width
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = color
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray, **options) -> bytes:
    """``image`` (H x W x 3 uint8) as PNG bytes; ``options`` go to Pillow's PNG writer (e.g. compress_level)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", **options)
    return buffer.getvalue()


_image_seed = itertools.count(1000)


def new_image(height: int = 120, width: int = 160) -> bytes:
    """A PNG no earlier call in this process has sent (so its embedding is not cached anywhere)."""
    return png_bytes(synthetic_image(height, width, seed=next(_image_seed)))
