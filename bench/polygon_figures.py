"""The pure parts of bench/polygons_cpu.py (no Triton, no torch; the unit tier uses them): the noisy masks, and the
figures of a set of masks turned into polygons."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import cv2
import numpy as np


def noisy_mask(seed: int, height: int = 320, width: int = 384, speckle: float = 3e-4) -> np.ndarray:
    """bool, H x W: seeded random blobs (jagged polygons, blurred with noise, a few punched holes) plus
    salt-and-pepper: the worst a model's mask looks like."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, radius = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height, rng.uniform(30, 90)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
        radii = radius * rng.uniform(0.6, 1.0, angles.size)
        outline = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(outline).astype(np.int32)], (1,))
        cv2.circle(canvas, (int(cx), int(cy)), int(rng.uniform(3, 8)), (0,), -1)
    noisy = canvas.astype(np.float32) + rng.normal(0, 0.6, canvas.shape).astype(np.float32)
    mask = cv2.GaussianBlur(noisy, (0, 0), 3) > 0.5
    salt = rng.random(mask.shape)
    mask[salt < speckle] = True
    mask[salt > 1 - speckle] = False
    return mask


@dataclasses.dataclass(frozen=True)
class MaskRecord:
    """One mask turned into polygons at the default tolerance."""

    iou: float
    """Of the polygons (holes included) with the mask."""
    exteriors_iou: float
    """Of the exterior rings alone (holes filled: what a hole-less format such as Label Studio's polygons gets)."""
    tolerance_px: float
    """The tolerance the answer was made with (under the default where that kept the IoU at the floor)."""
    vertices: int
    traced_vertices: int
    """Vertices of the traced outline (tolerance 0)."""
    dropped_parts: int
    seconds: float
    """mask_to_polygons, in this process."""


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def figures(records: list[MaskRecord], default_tolerance_px: float, min_iou: float) -> dict[str, Any]:
    """The figures of ``records``: IoU (min, 5th percentile, median), the share simplified under the default
    tolerance, vertices against the traced outline, dropped parts, time per mask, and the floor met."""
    ious = [r.iou for r in records]
    return {
        "masks": len(records),
        "iou": {"min": min(ious), "p5": quantile(ious, 0.05), "median": statistics.median(ious)},
        "exteriors_only_iou": {"min": min(r.exteriors_iou for r in records),
                               "median": statistics.median(r.exteriors_iou for r in records)},
        "simplified_under_default_tolerance": sum(r.tolerance_px < default_tolerance_px for r in records),
        "vertices_median": statistics.median(r.vertices for r in records),
        "traced_vertices_median": statistics.median(r.traced_vertices for r in records),
        "vertices_over_traced": sum(r.vertices for r in records) / sum(r.traced_vertices for r in records),
        "dropped_parts": sum(r.dropped_parts for r in records),
        "ms_per_mask_median": statistics.median(r.seconds for r in records) * 1000,
        "iou_floor_met": min(ious) >= min_iou,
    }
