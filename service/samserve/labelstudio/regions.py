"""Masks as Label Studio regions (the ``result`` items of a prediction), under the labeling config's own names.

* BrushLabels: ``value.rle`` is Label Studio's brush RLE, made by its own converter (``label_studio_converter.brush
  .mask2rle``: the H x W mask, row-major, as RGBA bytes of 0 or 255).
* PolygonLabels: one region per part, its exterior ring in percent of the image. Label Studio's polygons have no
  holes, so a hole is filled; the brush keeps it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
from label_studio_converter import brush

from samserve.labelstudio.config import LabelingConfig


def _region(config: LabelingConfig, width: int, height: int, value: dict[str, Any], score: float) -> dict[str, Any]:
    return {"id": secrets.token_hex(5), "from_name": config.answer.name, "to_name": config.image_name,
            "type": config.answer_type, "original_width": width, "original_height": height, "image_rotation": 0,
            "value": value, "score": score, "readonly": False}


def brush_region(config: LabelingConfig, mask: np.ndarray, label: str, score: float) -> dict[str, Any]:
    """``mask``: bool, H x W, in image pixels."""
    height, width = mask.shape
    rle = brush.mask2rle(mask.astype(np.uint8) * 255)
    return _region(config, width, height, {"format": "rle", "rle": rle, "brushlabels": [label]}, score)


def polygon_regions(config: LabelingConfig, exteriors: Sequence[Sequence[float]], width: int, height: int,
                    label: str, score: float) -> list[dict[str, Any]]:
    """``exteriors``: COCO polygons ([x1, y1, x2, y2, ...] in image pixels), one per part."""
    regions = []
    for ring in exteriors:
        points = np.asarray(ring, dtype=np.float64).reshape(-1, 2) / (width, height) * 100
        regions.append(_region(config, width, height, {"points": points.tolist(), "polygonlabels": [label],
                                                       "closed": True}, score))
    return regions


def prediction(regions: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """One task's answer: its regions, their mean score, the model version."""
    scores = [region["score"] for region in regions]
    return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0, "model_version": model_version}
