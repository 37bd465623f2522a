"""Masks as polygons (the core of ``MASK_ENCODING_POLYGON``): outlines traced by OpenCV, simplified to a
tolerance, with holes, and the IoU of the polygons rasterised back against the mask they came from.

Arrays: masks are H x W (row-major, ``mask[y, x]``; x = column, y = row), bool or uint8 (non-zero = in the mask).

Coordinates are COCO's pixel coordinates: pixel (x, y) covers [x, x + 1) x [y, y + 1), so its centre is
(x + 0.5, y + 0.5). ``cv2.findContours`` traces the centres of the mask's boundary pixels (integers in its own
convention, pixel centre = (x, y)), so every vertex is the traced point + 0.5 (:data:`PIXEL_CENTRE`), as
Detectron2 writes COCO polygons. :func:`polygons_to_mask` undoes the shift before ``cv2.fillPoly``, which rounds
vertices to the nearest pixel centre and fills the pixels on the outline too, so at tolerance 0 the rings give the
mask back exactly. With that rasteriser +0.5 and no shift score the same IoU (fillPoly rounds x - 0.5 up to x);
with pycocotools' rasteriser (``frPyObjects``, the COCO consumer) +0.5 scored higher than no shift on disks and
ellipses (0.985 vs 0.979 on a radius-60 disk at tolerance 0; 0.991 vs 0.982 at 1 px) and the same on axis-aligned
rectangles, hence the shift. A ring runs through the centres of its boundary pixels, so polygon *areas* are about
half a pixel per unit of outline smaller than the pixel counts (the pixels an outline passes through belong to
the region).

Rings follow GeoJSON / shapely: an ``exterior`` ring outlines a part, an ``interior`` ring outlines a hole in the
exterior ring named by its ``parent`` (an index into :attr:`PolygonSet.rings`; every hole comes after its exterior).
OpenCV traces a hole along the mask pixels around it (8-connected), so an interior ring's vertices are centres of
mask pixels, which stay in the mask when it is rasterised (the region is closed: all its rings belong to it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from samserve.core.errors import InvalidArgument

TOLERANCE_FIELD = "polygon_tolerance_px"
"""The request field :func:`validate_tolerance` names in its InvalidArgument."""
MAX_TOLERANCE_PX = 1000.0
"""Largest simplification tolerance accepted, in pixels (beyond it every part degenerates)."""
DEFAULT_TOLERANCE_PX = 1.0
MIN_IOU = 0.98
"""The IoU with its mask that an answer's polygons keep: below it, the mask is simplified again with half the
tolerance (down to 0, the traced outline, which gives the mask back exactly)."""
DEFAULT_MIN_AREA_PX = 4.0
"""Parts and holes of fewer pixels are dropped: single pixels and pairs (salt-and-pepper specks) go, a 2 x 2
square stays."""
PIXEL_CENTRE = 0.5
"""Added to OpenCV's contour coordinates to give COCO pixel coordinates (see the module docstring)."""
_SUBPIXEL_BITS = 4
"""Fractional bits of the fixed-point vertices handed to cv2.fillPoly / polylines."""

Role = Literal["exterior", "interior"]


@dataclasses.dataclass(frozen=True)
class Ring:
    """One closed ring: ``points`` flat COCO-style [x1, y1, x2, y2, ...] (floats, COCO pixel coordinates of the
    original image, first vertex not repeated), ``role`` "exterior" (a part) or "interior" (a hole), ``parent`` the
    index in :attr:`PolygonSet.rings` of the exterior ring a hole is in (None for exteriors)."""

    points: list[float]
    role: Role
    parent: int | None = None

    def vertices(self) -> np.ndarray:
        """float64, N x 2: the (x, y) vertices."""
        return np.asarray(self.points, dtype=np.float64).reshape(-1, 2)

    def to_json(self) -> dict[str, object]:
        """The ring as the CLI's and the typed client's JSON write it: points, role, parent (null for exteriors)."""
        return {"points": self.points, "role": self.role, "parent": self.parent}


@dataclasses.dataclass(frozen=True)
class PolygonSet:
    """The polygons of one H x W mask: ``rings`` (each exterior followed by its holes), ``dropped_parts`` (traced
    parts and holes left out: under the minimum area, fewer than 3 vertices, or inside a dropped part), ``iou``
    (of :func:`polygons_to_mask` of these rings with the mask: 1.0 for an empty mask, which gives no rings, and
    0.0 for a non-empty mask all of whose parts were dropped), ``height`` and ``width`` of the mask."""

    rings: list[Ring]
    dropped_parts: int
    iou: float
    height: int
    width: int
    tolerance_px: float = 0.0
    """The simplification tolerance these rings were made with (see :func:`mask_to_polygons`)."""

    def vertex_count(self) -> int:
        return sum(len(ring.points) // 2 for ring in self.rings)


def validate_tolerance(value: float) -> float:
    """``value`` as a float when it is a usable simplification tolerance in pixels: finite, in [0,
    :data:`MAX_TOLERANCE_PX`]; else InvalidArgument naming :data:`TOLERANCE_FIELD`."""
    try:
        tolerance = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{TOLERANCE_FIELD} must be a number, not {value!r}", field=TOLERANCE_FIELD) from None
    if isinstance(value, bool) or not math.isfinite(tolerance):
        raise InvalidArgument(f"{TOLERANCE_FIELD} must be a finite number, not {value!r}", field=TOLERANCE_FIELD)
    if not 0.0 <= tolerance <= MAX_TOLERANCE_PX:
        raise InvalidArgument(f"{TOLERANCE_FIELD} must be in [0, {MAX_TOLERANCE_PX:g}] pixels, not {tolerance:g}",
                              field=TOLERANCE_FIELD)
    return tolerance


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = DEFAULT_TOLERANCE_PX,
                     min_area_px: float = DEFAULT_MIN_AREA_PX, min_iou: float = MIN_IOU) -> PolygonSet:
    """The outlines of an H x W bool / uint8 ``mask`` (non-zero = in the mask), as rings, simplified with
    ``tolerance_px`` or, where that gives an IoU with the mask under ``min_iou``, with half of it, a quarter, ...
    down to 0 (``PolygonSet.tolerance_px`` says which): a small or thin part loses most of its area to a 1-pixel
    simplification, which cuts the outline's convex stretches inwards. Where even the traced outline stays under
    ``min_iou`` because the parts and holes under ``min_area_px`` carry too much of the mask (a fragmented mask),
    the same refinement runs again keeping every part and hole the trace can hold (``dropped_parts`` then counts
    only those under 3 traced vertices).

    Contours come from ``cv2.findContours`` (RETR_CCOMP: parts and their holes; an island in a hole is a part of
    its own), every traced vertex kept, then ``cv2.approxPolyDP`` with epsilon ``tolerance_px`` (0: no
    simplification). A part's area is its pixels, outline included; a hole's, its pixels: both from Pick's theorem
    on the traced outline (exact for outlines that do not touch themselves). Parts and holes under ``min_area_px``
    are dropped (a part with its holes), and so is a ring simplified below 3 vertices whose traced outline also has
    fewer than 3 (a simplified ring that collapses, a 1-pixel-wide stroke, falls back to its traced outline).
    Raises InvalidArgument for a bad tolerance (:func:`validate_tolerance`), ValueError for a mask that is not 2-D.
    """
    asked = validate_tolerance(tolerance_px)
    pixels = _as_uint8(mask)
    contours, hierarchy = cv2.findContours(pixels, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    for min_area in dict.fromkeys((min_area_px, 0.0)):
        tolerance = asked
        while True:
            polygons = _traced_to_polygons(pixels, contours, hierarchy, tolerance, min_area)
            if polygons.iou >= min_iou:
                return polygons
            if tolerance == 0:
                break
            tolerance = tolerance / 2 if tolerance > 2 * _FINEST_TOLERANCE_PX else 0.0
    return polygons


_FINEST_TOLERANCE_PX = 0.25
"""Below this, the retries of :func:`mask_to_polygons` go straight to 0 (approxPolyDP then only drops the collinear
vertices of the traced outline)."""


def _traced_to_polygons(pixels: np.ndarray, contours: Sequence[np.ndarray], hierarchy: np.ndarray | None,
                        tolerance: float, min_area_px: float) -> PolygonSet:
    """The PolygonSet of traced ``contours`` (``cv2.findContours`` RETR_CCOMP of ``pixels``) at one tolerance."""
    height, width = pixels.shape
    rings: list[Ring] = []
    dropped = 0
    if contours and hierarchy is not None:
        links = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
        for index in np.flatnonzero(links[:, 3] < 0):
            holes = _children(links, int(index))
            exterior = _ring_points(contours[index], tolerance, min_area_px, hole=False)
            if exterior is None:
                dropped += 1 + len(holes)
                continue
            parent = len(rings)
            rings.append(Ring(exterior, "exterior"))
            for hole in holes:
                points = _ring_points(contours[hole], tolerance, min_area_px, hole=True)
                if points is None:
                    dropped += 1
                else:
                    rings.append(Ring(points, "interior", parent))
    redrawn = _rasterise(rings, height, width)
    truth = pixels.astype(bool)
    union = int(np.count_nonzero(redrawn | truth))
    iou = float(np.count_nonzero(redrawn & truth)) / union if union else 1.0
    return PolygonSet(rings, dropped, iou, height, width, tolerance)


def polygons_to_mask(polygons: PolygonSet, height: int, width: int) -> np.ndarray:
    """H x W bool: the union over exterior rings of the pixels the ring covers less the pixels strictly inside its
    holes. Vertices are COCO pixel coordinates, rounded to the nearest pixel centre; the pixels a ring's outline
    passes through are in the mask, for holes too (``cv2.fillPoly`` and ``cv2.polylines``, 8-connected)."""
    return _rasterise(polygons.rings, height, width)


def coco_segmentation(polygons: PolygonSet) -> list[list[float]]:
    """COCO's polygon ``segmentation``: the points of every exterior ring, in order. COCO polygons cannot hold
    holes (pycocotools unions the lists), so holes are only given by the rings' roles in the PolygonSet; a client
    that needs them reads :attr:`PolygonSet.rings`."""
    return [list(ring.points) for ring in polygons.rings if ring.role == "exterior"]


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask is H x W, not of shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(np.minimum(array, 1))
    return np.ascontiguousarray(array != 0, dtype=np.uint8)


def _children(links: np.ndarray, index: int) -> list[int]:
    """Indices of the holes of contour ``index`` (RETR_CCOMP: its children, linked by ``next``)."""
    holes = []
    child = int(links[index, 2])
    while child >= 0:
        holes.append(child)
        child = int(links[child, 0])
    return holes


def _ring_points(contour: np.ndarray, tolerance: float, min_area_px: float, hole: bool) -> list[float] | None:
    """The flat COCO points of one traced contour (N x 1 x 2 int32, pixel centres), or None when it is dropped."""
    traced = contour.reshape(-1, 2)
    boundary = len(traced)
    enclosed = abs(float(cv2.contourArea(contour)))
    # Pick's theorem, A = I + B / 2 - 1: the pixels strictly inside are I, the pixels of the outline B.
    area = enclosed - boundary / 2 + 1 if hole else enclosed + boundary / 2 + 1
    if area < min_area_px:
        return None
    vertices = traced
    if tolerance > 0:
        simplified = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2)
        if len(simplified) >= 3:
            vertices = simplified
    if len(vertices) < 3:
        return None
    points: list[float] = (vertices.astype(np.float64) + PIXEL_CENTRE).reshape(-1).tolist()
    return points


def _fixed_point(ring: Ring) -> np.ndarray:
    """int32, N x 1 x 2: the ring's vertices in OpenCV's pixel-centre convention, fixed point for ``shift``."""
    scale = 1 << _SUBPIXEL_BITS
    return np.round((ring.vertices() - PIXEL_CENTRE) * scale).astype(np.int32).reshape(-1, 1, 2)


def _rasterise(rings: list[Ring], height: int, width: int) -> np.ndarray:
    """H x W bool of ``rings`` (see :func:`polygons_to_mask`): each part drawn on its own and OR-ed in, so an
    island inside a hole of another part survives whatever the ring order."""
    canvas = np.zeros((height, width), np.uint8)
    holes: dict[int, list[np.ndarray]] = {}
    for ring in rings:
        if ring.role == "interior" and ring.parent is not None:
            holes.setdefault(ring.parent, []).append(_fixed_point(ring))
    for index, ring in enumerate(rings):
        if ring.role != "exterior":
            continue
        outline = _fixed_point(ring)
        if index not in holes:
            cv2.fillPoly(canvas, [outline], (1,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
            continue
        # Drawn in the part's bounding box (clipped to the canvas), so a mask with many holed parts stays cheap.
        x0, y0 = np.maximum((outline.reshape(-1, 2).min(axis=0) >> _SUBPIXEL_BITS) - 1, 0)
        x1, y1 = np.minimum((outline.reshape(-1, 2).max(axis=0) >> _SUBPIXEL_BITS) + 2, (width, height))
        if x0 >= x1 or y0 >= y1:
            continue
        corner = np.array([x0, y0], np.int32) << _SUBPIXEL_BITS
        part = np.zeros((y1 - y0, x1 - x0), np.uint8)
        inner = [hole - corner for hole in holes[index]]
        cv2.fillPoly(part, [outline - corner], (1,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        cv2.fillPoly(part, inner, (0,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        cv2.polylines(part, inner, True, (1,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        canvas[y0:y1, x0:x1] |= part
    return canvas.astype(bool)
