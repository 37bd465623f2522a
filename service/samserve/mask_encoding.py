"""Mask encodings of the API: COCO RLE (as pycocotools writes it), PNG, and low-res logits."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as coco_mask


def coco_rle(masks: np.ndarray) -> list[dict]:
    """COCO compressed RLE of K x H x W bool masks: [{"size": [H, W], "counts": bytes}, ...].

    Masks stored column-major (as :func:`samserve.processing.upscale_logits` produces them) encode without a copy.
    """
    return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0)).view(np.uint8))


def rle_areas(rles: list[dict]) -> np.ndarray:
    """int64, K: pixels of each COCO RLE (counted on the runs, nothing decoded)."""
    return np.asarray(coco_mask.area(rles), dtype=np.int64).reshape(-1) if rles else np.zeros(0, np.int64)


def png(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG of one H x W bool mask (255 = mask)."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def decode_rle(size: list[int], counts: bytes) -> np.ndarray:
    """H x W bool mask from a COCO compressed RLE."""
    return coco_mask.decode({"size": list(size), "counts": counts}).astype(bool)


def decode_png(data: bytes) -> np.ndarray:
    """H x W bool mask from the API's PNG."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) > 127
