"""Automatic mask generation ("segment everything"): the official ``SamAutomaticMaskGenerator``, reorganized for speed.

The steps, parameters and outputs are those of ``segment_anything.automatic_mask_generator``:

1. crop boxes: layer 0 is the whole image, layer i has (2^i)^2 overlapping crops; each layer has a point grid;
2. per crop: the crop's embedding, the grid scaled to the crop, decoded as single-point prompts (the point plus a
   padding token) in batches of ``points_per_batch``, multimask outputs 1..3; keep predicted IoU above
   ``pred_iou_thresh`` and stability at least ``stability_score_thresh``; threshold at the model's mask threshold;
   drop masks whose box lies near an inner crop edge; box NMS within the crop, scored by predicted IoU;
3. across crops: box NMS scored by 1 / crop area (masks from smaller crops win);
4. ``min_mask_region_area`` > 0: fill small holes, remove small islands, NMS again preferring unchanged masks.

What differs is where the work happens:

* the predicted-IoU filter runs on the decoder's output before anything is upscaled (the official predictor
  upscales all 3 x ``points_per_batch`` logit planes to full resolution first, then filters);
* stability is first estimated on the low-resolution logits (over the image part of the padded frame); only masks
  within :data:`STABILITY_PREFILTER_MARGIN` of the threshold or above are upscaled, and the exact full-resolution
  score decides;
* full-resolution work is one plane at a time on the post-processing threads (upscale, exact stability, box,
  COCO RLE straight from the column-major mask); masks are then held as RLE; NMS is vectorized numpy;
* decoder batches are pipelined with post-processing, several in flight (Triton batches them dynamically).

Coordinates: points and boxes are (x, y) pixels of the ORIGINAL image unless a name says ``crop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence

import cv2
import numpy as np

from samserve.core import model_spec
from samserve.core.embedding import CropBox, EmbeddedImage
from samserve.core.errors import InvalidArgument
from samserve.vision import mask_encoding, processing
from samserve.vision.processing import DecoderBatch
from samserve.vision.segmentation import POSTPROCESS_POOL, map_in_pool, postprocess_plane

STABILITY_PREFILTER_MARGIN = 0.1
"""Masks whose low-resolution stability estimate is at least ``stability_score_thresh - margin`` get the exact
full-resolution score. Measured on the test scenes (tests/unit/test_amg.py): masks scoring >= 0.9 exactly are
underestimated by at most ~0.05."""
STABILITY_PREFILTER_MIN_PIXELS = 64
"""Masks smaller than this at low resolution (pixels above the lower threshold) skip the estimate, which is coarse
for them, and always get the exact score."""
MAX_CROP_LAYERS = 3
EDGE_TOLERANCE_PX = 20.0
"""A box side within this many pixels of an inner crop edge counts as cut by the crop (official ``atol``)."""

class InvalidParameters(InvalidArgument):
    """A GenerateMasks parameter outside its domain; the message starts with the parameter's name, which is also
    the request field at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field=message.split(" ", 1)[0])


@dataclasses.dataclass(frozen=True)
class AmgParams:
    """The official generator's parameters, same names, defaults and meaning."""

    points_per_side: int | None = 32
    point_grids: tuple[np.ndarray, ...] | None = None
    """Exclusive with ``points_per_side``: per crop layer, float G x 2 (x, y) normalized to [0, 1]."""
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = processing.STABILITY_SCORE_OFFSET
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def validate(self, max_points_per_layer: int, max_points_per_batch: int) -> None:
        """Raise InvalidParameters naming the first parameter outside its domain."""
        floats = {
            "pred_iou_thresh": self.pred_iou_thresh, "stability_score_thresh": self.stability_score_thresh,
            "box_nms_thresh": self.box_nms_thresh, "crop_nms_thresh": self.crop_nms_thresh,
        }
        for name, value in floats.items():
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidParameters(f"{name} must lie in [0, 1], got {value}")
        if not (math.isfinite(self.stability_score_offset) and self.stability_score_offset >= 0):
            raise InvalidParameters(f"stability_score_offset must be >= 0, got {self.stability_score_offset}")
        if not (math.isfinite(self.crop_overlap_ratio) and 0.0 <= self.crop_overlap_ratio < 1.0):
            raise InvalidParameters(f"crop_overlap_ratio must lie in [0, 1), got {self.crop_overlap_ratio}")
        if not 0 <= self.crop_n_layers <= MAX_CROP_LAYERS:
            raise InvalidParameters(f"crop_n_layers must lie in [0, {MAX_CROP_LAYERS}], got {self.crop_n_layers}")
        if self.crop_n_points_downscale_factor < 1:
            raise InvalidParameters(
                f"crop_n_points_downscale_factor must be >= 1, got {self.crop_n_points_downscale_factor}")
        if self.min_mask_region_area < 0:
            raise InvalidParameters(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
        if not 1 <= self.points_per_batch <= max_points_per_batch:
            raise InvalidParameters(
                f"points_per_batch must lie in [1, {max_points_per_batch}], got {self.points_per_batch}")
        if (self.points_per_side is None) == (self.point_grids is None):
            raise InvalidParameters("points_per_side and point_grids: set exactly one of them")
        if self.points_per_side is not None and not 1 <= self.points_per_side ** 2 <= max_points_per_layer:
            raise InvalidParameters(
                f"points_per_side must lie in [1, {math.isqrt(max_points_per_layer)}], got {self.points_per_side}")
        if self.points_per_side is not None:
            smallest = self.crop_n_points_downscale_factor ** self.crop_n_layers  # the last layer's divisor
            if self.points_per_side < smallest:
                raise InvalidParameters(
                    f"points_per_side must be >= crop_n_points_downscale_factor ** crop_n_layers = {smallest} "
                    f"(every crop layer needs a grid of at least 1 x 1 points), got {self.points_per_side}")
        if self.point_grids is not None:
            if len(self.point_grids) != self.crop_n_layers + 1:
                raise InvalidParameters(f"point_grids needs crop_n_layers + 1 = {self.crop_n_layers + 1} grids, "
                                        f"got {len(self.point_grids)}")
            for layer, grid in enumerate(self.point_grids):
                if grid.ndim != 2 or grid.shape[1] != 2 or not 1 <= len(grid) <= max_points_per_layer:
                    raise InvalidParameters(f"point_grids[{layer}] must hold 1..{max_points_per_layer} (x, y) points")
                if not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 1:
                    raise InvalidParameters(f"point_grids[{layer}] has points outside [0, 1] x [0, 1]")

    def grids(self) -> list[np.ndarray]:
        """float64 G x 2 normalized (x, y) points for each crop layer (official ``build_all_layer_point_grids``)."""
        if self.point_grids is not None:
            return [np.asarray(grid, dtype=np.float64) for grid in self.point_grids]
        assert self.points_per_side is not None
        return [
            build_point_grid(int(self.points_per_side / (self.crop_n_points_downscale_factor ** layer)))
            for layer in range(self.crop_n_layers + 1)
        ]

    def decoder_prompts(self) -> int:
        """Decoder prompts of one run: every crop layer's grid points times its crops (layer i has 4^i crops)."""
        return sum(len(grid) * 4**layer for layer, grid in enumerate(self.grids()))


SCALAR_PARAMETERS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AmgParams) if f.name != "point_grids")
"""The parameters that are one number (the GenerateMasks request fields and the bulk job's options)."""


def build_point_grid(n_per_side: int) -> np.ndarray:
    """float64, n^2 x 2: an evenly spaced grid in [0, 1]^2, x fastest (official ``build_point_grid``)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    return np.stack([np.tile(side[None, :], (n_per_side, 1)), np.tile(side[:, None], (1, n_per_side))],
                    axis=-1).reshape(-1, 2)


def crop_boxes(original_hw: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[CropBox, int]]:
    """(crop box XYXY, layer) for every crop, whole image first (official ``generate_crop_boxes``)."""
    height, width = original_hw
    boxes: list[tuple[CropBox, int]] = [((0, 0, width, height), 0)]
    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * min(height, width) * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        xs = [int((crop_w - overlap) * i) for i in range(per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in itertools.product(xs, ys):
            boxes.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer + 1))
    return boxes


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """int64, K x 4 XYXY inclusive pixel indices of K x H x W bool masks; [0, 0, 0, 0] for an empty mask
    (official ``batched_mask_to_box``)."""
    if len(masks) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    rows = masks.any(axis=2)  # K x H
    cols = masks.any(axis=1)  # K x W
    height, width = rows.shape[1], cols.shape[1]
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    bottom, right = height - 1 - rows[:, ::-1].argmax(axis=1), width - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([left, top, right, bottom], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (torchvision ``nms`` on float32 XYXY boxes: stable sort,
    area (x1 - x0) * (y1 - y0), suppress IoU > threshold). ``boxes``: K x 4; ``scores``: K.

    Memory is O(K): the IoUs of each kept box with the boxes after it, one row at a time (a K x K matrix is
    gigabytes for the 3 x 128^2 masks one GenerateMasks call may keep)."""
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float32)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    b = boxes[order]
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    threshold = float(iou_threshold)
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = b[i + 1 :]
        inter_w = np.maximum(np.minimum(b[i, 2], rest[:, 2]) - np.maximum(b[i, 0], rest[:, 0]), 0)
        inter_h = np.maximum(np.minimum(b[i, 3], rest[:, 3]) - np.maximum(b[i, 1], rest[:, 1]), 0)
        inter = inter_w * inter_h
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = inter / (areas[i] + areas[i + 1 :] - inter)  # float32, as torchvision computes it
        suppressed[i + 1 :] |= ratio.astype(np.float64) > threshold  # compared in double, as in C++; NaN never
    return order[np.asarray(keep, dtype=np.int64)]


def near_crop_edge(boxes: np.ndarray, crop: CropBox, original_hw: tuple[int, int]) -> np.ndarray:
    """bool, K: a side of the (crop-frame, XYXY) box lies within 20 px of an inner crop edge, i.e. an edge of
    the crop that is not an edge of the image (official ``is_box_near_crop_edge``)."""
    x0, y0, _, _ = crop
    uncropped = boxes.astype(np.float32) + np.array([x0, y0, x0, y0], dtype=np.float32)
    crop_edges = np.asarray(crop, dtype=np.float32)
    image_edges = np.array([0, 0, original_hw[1], original_hw[0]], dtype=np.float32)
    near_crop = np.abs(uncropped - crop_edges) <= EDGE_TOLERANCE_PX
    near_image = np.abs(uncropped - image_edges) <= EDGE_TOLERANCE_PX
    return np.any(near_crop & ~near_image, axis=1)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh`` in an H x W
    bool mask; returns (mask, changed). 8-connectivity; if every island is small the largest stays (official)."""
    holes = mode == "holes"
    working = np.ascontiguousarray(holes ^ mask, dtype=np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if holes:
        fill = np.concatenate([[0], small])
    else:
        fill = np.setdiff1d(np.arange(1, n_labels), small)
        if len(fill) == 0:
            fill = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, fill), True


Rle = dict
"""COCO compressed RLE as pycocotools writes it: {"size": [h, w], "counts": bytes}."""


@dataclasses.dataclass
class MaskSet:
    """Masks with their records; every field has K rows (K masks), in the official generator's order.

    Masks are held as COCO RLE (as the official generator holds them), so memory follows the masks' outlines,
    not the image size times their number."""

    masks: list[Rle]
    """Each mask inside its frame ``frames[k]``."""
    frames: np.ndarray
    """int64, K x 4 XYXY: where each stored mask lies in the original image (its crop, or the whole image)."""
    boxes: np.ndarray
    """int64, K x 4 XYXY inclusive, original-image pixels."""
    predicted_iou: np.ndarray
    """float32, K."""
    stability_score: np.ndarray
    """float32, K."""
    points: np.ndarray
    """float64, K x 2 (x, y), original-image pixels: the grid point that produced each mask."""
    crop_boxes: np.ndarray
    """int64, K x 4 XYXY: the crop each mask was generated in."""

    @classmethod
    def empty(cls) -> MaskSet:
        boxes = np.zeros((0, 4), np.int64)
        return cls([], boxes, boxes, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 2)), boxes)

    def take(self, keep: np.ndarray) -> MaskSet:
        keep = np.asarray(keep, dtype=np.int64)
        return MaskSet([self.masks[i] for i in keep], self.frames[keep], self.boxes[keep], self.predicted_iou[keep],
                       self.stability_score[keep], self.points[keep], self.crop_boxes[keep])

    @classmethod
    def concat(cls, parts: Sequence[MaskSet]) -> MaskSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            [m for p in parts for m in p.masks], np.concatenate([p.frames for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.predicted_iou for p in parts]), np.concatenate([p.stability_score for p in parts]),
            np.concatenate([p.points for p in parts]), np.concatenate([p.crop_boxes for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.masks)

    def _in_whole_frame(self, k: int, original_hw: tuple[int, int]) -> bool:
        return tuple(int(v) for v in self.frames[k]) == (0, 0, original_hw[1], original_hw[0])

    def mask(self, k: int, original_hw: tuple[int, int]) -> np.ndarray:
        """bool, H x W: mask k in the whole-image frame, stored column-major."""
        height, width = original_hw
        inside = mask_encoding.decode_rle(self.masks[k]["size"], self.masks[k]["counts"])
        if self._in_whole_frame(k, original_hw):
            return inside
        x0, y0, x1, y1 = (int(v) for v in self.frames[k])
        out = np.zeros((width, height), dtype=bool)
        out[x0:x1, y0:y1] = inside.T
        return out.T

    def whole_frame_rles(self, original_hw: tuple[int, int]) -> list[Rle]:
        """Every mask's RLE in the whole-image frame (masks of crops are re-encoded; the others are as held)."""
        return [
            rle if self._in_whole_frame(k, original_hw) else mask_encoding.coco_rle(self.mask(k, original_hw)[None])[0]
            for k, rle in enumerate(self.masks)
        ]


def single_point_batch(points: np.ndarray, image: EmbeddedImage, low_res_mask_size: tuple[int, int]) -> DecoderBatch:
    """Decoder inputs for N foreground points (N x 2, crop pixels): each prompt is the point plus a padding
    token, exactly what the official predictor sends for a point without a box."""
    n = len(points)
    coords = np.zeros((n, 2, 2), dtype=np.float32)
    coords[:, 0] = processing.scale_coords(points, image.original_size, image.input_size)
    labels = np.empty((n, 2), dtype=np.float32)
    labels[:, 0], labels[:, 1] = model_spec.LABEL_FOREGROUND, model_spec.LABEL_PADDING
    return DecoderBatch(
        prompt_indices=list(range(n)), point_coords=coords, point_labels=labels,
        mask_input=np.zeros((n, 1, *low_res_mask_size), dtype=np.float32), has_mask_input=np.zeros(n, np.float32),
    )


def stability_prefilter(
    logits: np.ndarray, image: EmbeddedImage, image_size: int, mask_threshold: float, offset: float, threshold: float
) -> np.ndarray:
    """bool, K: which of K x 4h x 4w logit planes may reach ``threshold`` and need the exact full-resolution
    stability score (see :data:`STABILITY_PREFILTER_MARGIN`)."""
    estimate, outer = low_res_stability(logits, image, image_size, mask_threshold, offset)
    return (estimate >= threshold - STABILITY_PREFILTER_MARGIN) | (outer < STABILITY_PREFILTER_MIN_PIXELS)


def low_res_stability(
    logits: np.ndarray, image: EmbeddedImage, image_size: int, mask_threshold: float, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 K stability estimate, int64 K pixels above the lower threshold) of K x 4h x 4w logit planes, over
    the part of the padded frame that the image covers."""
    scale = logits.shape[-1] / image_size
    rows, cols = (max(1, math.ceil(side * scale)) for side in image.input_size)
    valid = np.ascontiguousarray(logits[:, :rows, :cols])
    outer = processing.mask_areas(valid > mask_threshold - offset)
    return processing.stability_score(valid, mask_threshold, offset), outer


Decode = Callable[[EmbeddedImage, DecoderBatch], Awaitable[tuple[np.ndarray, np.ndarray]]]
"""(image, batch) -> (low-res logits float32 N x M x 4h x 4w, predicted IoU float32 N x M)."""
CropEmbedding = Callable[[CropBox], contextlib.AbstractAsyncContextManager[EmbeddedImage]]
"""crop box -> the crop's embedded image (original_size = the crop's size), held for the context's duration."""


@dataclasses.dataclass
class Progress:
    """Work done so far (for metrics and logs)."""

    crops: int = 0
    points: int = 0


class MaskGenerator:
    """Runs the algorithm for one image; model calls are injected (Triton in the gateway, fakes in unit tests)."""

    def __init__(
        self, params: AmgParams, meta: model_spec.ModelMetadata, decode: Decode, crop_embedding: CropEmbedding,
        decoder_calls_in_flight: int = 3, crops_in_flight: int = 2,
    ) -> None:
        self.params = params
        self.meta = meta
        self.decode = decode
        self.crop_embedding = crop_embedding
        self.in_flight = asyncio.Semaphore(decoder_calls_in_flight)
        self.crop_slots = asyncio.Semaphore(crops_in_flight)
        """Crops whose embedding is held (and encoded, on a miss) at once: 85 crops at crop_n_layers=3."""
        self.progress = Progress()

    async def generate(self, original_hw: tuple[int, int]) -> MaskSet:
        """Every mask of the image (official ``SamAutomaticMaskGenerator.generate`` order and filters)."""
        params = self.params
        grids = params.grids()
        crops = crop_boxes(original_hw, params.crop_n_layers, params.crop_overlap_ratio)
        parts = await asyncio.gather(*(self._crop(box, grids[layer], original_hw) for box, layer in crops))
        masks = MaskSet.concat(parts)
        if len(crops) > 1 and len(masks):
            boxes = masks.crop_boxes
            crop_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            masks = masks.take(box_nms(masks.boxes, 1.0 / crop_area.astype(np.float32), params.crop_nms_thresh))
        if params.min_mask_region_area > 0 and len(masks):
            masks = await asyncio.get_running_loop().run_in_executor(
                POSTPROCESS_POOL, postprocess_small_regions, masks, original_hw, params.min_mask_region_area,
                max(params.box_nms_thresh, params.crop_nms_thresh),
            )
        return masks

    async def _crop(self, crop: CropBox, grid: np.ndarray, original_hw: tuple[int, int]) -> MaskSet:
        async with self.crop_slots, self.crop_embedding(crop) as image:
            crop_h, crop_w = image.original_size
            points = grid * np.array([[crop_w, crop_h]], dtype=np.float64)
            batches = [points[i : i + self.params.points_per_batch]
                       for i in range(0, len(points), self.params.points_per_batch)]
            parts = await asyncio.gather(*(self._batch(image, crop, batch, original_hw) for batch in batches))
        self.progress.crops += 1
        masks = MaskSet.concat(parts)
        if not len(masks):
            return masks
        masks = masks.take(box_nms(masks.boxes, masks.predicted_iou, self.params.box_nms_thresh))
        x0, y0 = crop[0], crop[1]
        masks.boxes = masks.boxes + np.array([x0, y0, x0, y0], dtype=np.int64)
        masks.points = masks.points + np.array([x0, y0], dtype=np.float64)
        return masks

    async def _batch(
        self, image: EmbeddedImage, crop: CropBox, points: np.ndarray, original_hw: tuple[int, int]
    ) -> MaskSet:
        async with self.in_flight:
            low_res, iou = await self.decode(image, single_point_batch(points, image, self.meta.low_res_mask_size))
            self.progress.points += len(points)
            return await self._filter(low_res, iou, points, image, crop, original_hw)

    async def _filter(
        self, low_res: np.ndarray, iou: np.ndarray, points: np.ndarray, image: EmbeddedImage, crop: CropBox,
        original_hw: tuple[int, int],
    ) -> MaskSet:
        """The official ``_process_batch`` with the cheap filters first. ``low_res``: N x M x 4h x 4w."""
        params, meta = self.params, self.meta
        tokens = processing.select_masks(True, meta.num_mask_tokens)
        logits = low_res[:, tokens].reshape(-1, *low_res.shape[-2:])
        scores = iou[:, tokens].reshape(-1).astype(np.float32)
        point_of = np.repeat(points, tokens.stop - tokens.start, axis=0)
        keep = np.flatnonzero(scores > params.pred_iou_thresh) if params.pred_iou_thresh > 0 else np.arange(len(scores))
        loop = asyncio.get_running_loop()
        if params.stability_score_thresh > 0 and len(keep):
            keep = keep[await loop.run_in_executor(
                POSTPROCESS_POOL, stability_prefilter, logits[keep], image, meta.image_size, meta.mask_threshold,
                params.stability_score_offset, params.stability_score_thresh,
            )]
        planes = await map_in_pool(
            lambda k: full_resolution_mask(logits[k], image, meta, params.stability_score_offset,
                                           params.stability_score_thresh),
            keep.tolist(), image.original_size[0] * image.original_size[1],
        )
        passed = np.array([rle is not None for _, _, rle in planes], dtype=bool)
        keep = keep[passed] if len(keep) else keep
        planes = [plane for plane, ok in zip(planes, passed, strict=True) if ok]
        boxes = np.array([box for _, box, _ in planes], dtype=np.int64).reshape(-1, 4)
        inside = ~near_crop_edge(boxes, crop, original_hw)
        crop_rows = np.tile(np.asarray(crop, dtype=np.int64), (int(inside.sum()), 1))
        return MaskSet(
            [rle for (_, _, rle), ok in zip(planes, inside, strict=True) if ok and rle is not None],
            crop_rows, boxes[inside],
            scores[keep][inside],
            np.array([score for score, _, _ in planes], dtype=np.float32)[inside], point_of[keep][inside], crop_rows,
        )


def full_resolution_mask(
    logits: np.ndarray, image: EmbeddedImage, meta: model_spec.ModelMetadata, offset: float, stability_thresh: float
) -> tuple[float, np.ndarray | None, Rle | None]:
    """The full-resolution work for one 4h x 4w logit plane: (exact stability score, box XYXY inclusive in the
    crop's frame, COCO RLE); box and RLE are None when the score fails ``stability_thresh`` (0 / 0 is NaN, as in
    the official code, and fails every threshold). The H x W mask itself is dropped here."""
    mask, score = postprocess_plane(logits, image, meta, offset, math.nan)
    if stability_thresh > 0 and not score >= stability_thresh:
        return score, None, None
    return score, mask_boxes(mask[None])[0], mask_encoding.coco_rle(mask[None])[0]


def postprocess_small_regions(
    masks: MaskSet, original_hw: tuple[int, int], min_area: int, nms_thresh: float
) -> MaskSet:
    """Fill holes and remove islands smaller than ``min_area`` in every mask, then NMS preferring masks that did
    not change (official ``postprocess_small_regions``). Changed masks come back in the whole-image frame."""
    boxes = masks.boxes.copy()
    cleaned: list[Rle | None] = []
    for k in range(len(masks)):
        mask, changed_holes = remove_small_regions(masks.mask(k, original_hw), min_area, "holes")
        mask, changed_islands = remove_small_regions(mask, min_area, "islands")
        if changed_holes or changed_islands:
            cleaned.append(mask_encoding.coco_rle(mask[None])[0])
            boxes[k] = mask_boxes(mask[None])[0]
        else:
            cleaned.append(None)
    unchanged = np.array([rle is None for rle in cleaned], dtype=np.float32)
    keep = box_nms(boxes, unchanged, nms_thresh)
    result = masks.take(keep)
    whole = np.array([0, 0, original_hw[1], original_hw[0]], dtype=np.int64)
    for row, index in enumerate(keep):
        if cleaned[index] is not None:
            result.masks[row], result.frames[row], result.boxes[row] = cleaned[index], whole, boxes[index]
    return result
