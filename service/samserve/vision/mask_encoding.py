"""Mask encodings of the API: COCO RLE (as pycocotools writes it), PNG, and low-res logits."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as coco_mask

SPARSE_CHANGES = 1 / 128
"""Pixel changes (in column-major order) per pixel below which :func:`coco_rle` finds the runs with numpy:
measured on 768 x 1024 masks, numpy plus pycocotools' string compression takes ~0.6x the time of
``mask.encode`` on smooth masks (hundreds of runs) and breaks even near 1 / 128; numpy's search for the changes
is the slower one on noisy masks (1 change in 8 pixels: ~1.1x)."""
SAMPLED_COLUMNS = 16
"""Columns of a mask :func:`coco_rle` looks at to estimate its changes per pixel."""


def coco_rle(masks: np.ndarray) -> list[dict]:
    """COCO compressed RLE of K x H x W bool masks: [{"size": [H, W], "counts": bytes}, ...], byte for byte what
    pycocotools' ``mask.encode`` returns.

    A mask with few runs (:data:`SPARSE_CHANGES`, estimated on a sample of its columns) has its runs found with
    numpy (:func:`run_lengths`), and only its counts go through pycocotools' string compression; a noisy one goes
    to ``mask.encode`` itself. Masks stored column-major (as :func:`samserve.vision.processing.threshold_plane` makes
    them) encode without a copy.
    """
    rles = []
    for mask in masks:
        height, width = mask.shape
        pixels = column_major_bytes(mask)
        if few_changes(pixels.reshape(width, height)):
            counts = run_lengths(pixels)
            rles.append(coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width))
        else:
            rles.append(coco_mask.encode(pixels.reshape(width, height, 1).transpose(1, 0, 2))[0])
    return rles


def few_changes(columns: np.ndarray) -> bool:
    """Whether a W x H uint8 0 / 1 mask (one column per row) changes value less often than
    :data:`SPARSE_CHANGES` per pixel along its columns, judged on :data:`SAMPLED_COLUMNS` evenly spaced ones."""
    width, height = columns.shape
    sample = columns[:: max(1, width // SAMPLED_COLUMNS)]
    changes = np.count_nonzero(sample[:, 1:] != sample[:, :-1])
    return changes < SPARSE_CHANGES * sample.size


def column_major_bytes(mask: np.ndarray) -> np.ndarray:
    """uint8 (0 / 1), H * W: the pixels of one H x W bool mask in column-major (COCO) order; a view of the mask
    when it is stored column-major, else a copy."""
    columns = mask.T
    if columns.dtype != np.bool_:
        columns = columns.astype(bool)
    return np.ascontiguousarray(columns).reshape(-1).view(np.uint8)


def run_lengths(pixels: np.ndarray) -> np.ndarray:
    """uint32: the uncompressed COCO RLE counts of flat uint8 0 / 1 ``pixels``, as pycocotools' ``rleEncode``
    counts them: alternating runs of 0s and 1s, starting with 0s (a first count of 0 when the first pixel is 1);
    ``[0]`` for no pixels."""
    n = pixels.size
    if n == 0:
        return np.zeros(1, dtype=np.uint32)
    starts = np.flatnonzero(pixels[1:] != pixels[:-1])  # run k + 1 starts at starts[k] + 1
    bounds = np.empty(starts.size + 3, dtype=np.int64)
    bounds[0] = bounds[1] = 0  # an empty first run of 0s when the first pixel is 1, else dropped below
    np.add(starts, 1, out=bounds[2:-1])
    bounds[-1] = n
    return np.diff(bounds[0 if pixels[0] else 1 :]).astype(np.uint32)


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
