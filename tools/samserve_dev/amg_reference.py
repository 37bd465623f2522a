"""Helpers shared by the GenerateMasks tests: a scene-of-shapes stand-in for SAM's decoder (so that masks are real
shapes with real duplicates, holes and islands even without trained weights), the official generator driven by
it, and one-to-one matching of two mask sets by IoU."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from pycocotools import mask as coco_mask
from scipy.optimize import linear_sum_assignment
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

CropBox = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Shape:
    cx: float
    cy: float
    rx: float
    ry: float
    slope: float     # logit per pixel inside the boundary: sets the stability score
    quality: float   # predicted IoU
    hole: float      # radius of a hole at the centre (0: none)
    island: tuple[float, float, float] | None  # (x, y, r) of a detached blob (None: none)


class SceneDecoder:
    """Decoder stand-in: a point inside an object yields its part / whole / surroundings as the 3 multimask
    outputs (token 0 = whole), logits = slope x signed distance to the shape's boundary in pixels, predicted IoU
    per shape (slightly lower away from its centre). A point on the background yields a blurry low-score blob."""

    def __init__(self, original_hw: tuple[int, int], seed: int, image_size: int, low_res: int) -> None:
        rng = np.random.default_rng(seed)
        height, width = original_hw
        self.image_size, self.low_res = image_size, low_res
        self.objects: list[list[Shape]] = []
        for _ in range(40):
            cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
            r = rng.uniform(0.04, 0.22) * min(height, width)
            aspect = rng.uniform(0.6, 1.6)
            levels = []
            for level, scale in enumerate((0.5, 1.0, 1.6)):
                levels.append(Shape(
                    cx, cy, r * scale * aspect, r * scale / aspect,
                    slope=float(np.exp(rng.uniform(np.log(0.2), np.log(8.0)))),
                    quality=rng.uniform(0.8, 1.0), hole=rng.choice([0.0, 3.0]) if level else 0.0,
                    island=(cx + 1.3 * r * scale * aspect, cy, 3.0) if rng.random() < 0.3 else None,
                ))
            self.objects.append(levels)

    @staticmethod
    def _distance(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate distance in pixels inside the ellipse's boundary (positive inside)."""
        d = np.sqrt(((x - shape.cx) / shape.rx) ** 2 + ((y - shape.cy) / shape.ry) ** 2)
        return (1.0 - d) * min(shape.rx, shape.ry)

    def _logits(self, shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        inside = self._distance(shape, x, y)
        if shape.hole:
            inside = np.minimum(inside, np.hypot(x - shape.cx, y - shape.cy) - shape.hole)
        if shape.island is not None:
            ix, iy, ir = shape.island
            inside = np.maximum(inside, ir - np.hypot(x - ix, y - iy))
        return shape.slope * inside

    def __call__(
        self, points: np.ndarray, crop: CropBox, input_hw: tuple[int, int], crop_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """points: N x 2 in resized-crop pixels -> (logits float32 N x 4 x L x L, predicted IoU float32 N x 4)."""
        sx, sy = crop_hw[1] / input_hw[1], crop_hw[0] / input_hw[0]
        centres = (np.arange(self.low_res) + 0.5) * self.image_size / self.low_res
        gx = centres[None, :] * sx + crop[0]
        gy = centres[:, None] * sy + crop[1]
        logits = np.empty((len(points), 4, self.low_res, self.low_res), dtype=np.float32)
        iou = np.empty((len(points), 4), dtype=np.float32)
        for n, (px, py) in enumerate(np.asarray(points, dtype=np.float64)):
            x, y = px * sx + crop[0], py * sy + crop[1]
            hits = [levels for levels in self.objects if self._distance(levels[1], np.float64(x), np.float64(y)) > 0]
            if not hits:
                blob = Shape(x, y, 6.0, 6.0, 0.05, 0.3, 0.0, None)
                logits[n] = self._logits(blob, gx, gy)
                iou[n] = 0.3
                continue
            levels = min(hits, key=lambda lv: lv[1].rx * lv[1].ry)
            off_centre = float(np.hypot((x - levels[1].cx) / levels[1].rx, (y - levels[1].cy) / levels[1].ry))
            for token, shape in enumerate((levels[1], *levels)):
                logits[n, token] = self._logits(shape, gx, gy)
                iou[n, token] = shape.quality - 0.02 * off_centre
        return logits, iou


def official_generate(sam: Sam, decoder: SceneDecoder, image: np.ndarray, **params) -> list[dict]:
    """The official generator with ``decoder`` in place of the model's prompt decoder (everything else, from
    point grids to the RLEs, is the official code). COCO RLE output."""
    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params)
    predictor = generator.predictor
    state: dict[str, CropBox] = {}

    def set_image(cropped: np.ndarray, image_format: str = "RGB") -> None:
        predictor.reset_image()
        predictor.original_size = cropped.shape[:2]
        predictor.input_size = predictor.transform.get_preprocess_shape(*cropped.shape[:2], sam.image_encoder.img_size)
        predictor.is_image_set = True

    def predict_torch(point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        low_res, iou = decoder(point_coords[:, 0].numpy(), state["crop"], predictor.input_size,
                               predictor.original_size)
        masks = sam.postprocess_masks(torch.from_numpy(low_res), predictor.input_size, predictor.original_size)
        tokens = slice(1, None) if multimask_output else slice(0, 1)
        masks = masks[:, tokens] if return_logits else masks[:, tokens] > sam.mask_threshold
        return masks, torch.from_numpy(iou[:, tokens]), torch.from_numpy(low_res[:, tokens])

    process_crop = generator._process_crop

    def tracking_process_crop(image, crop_box, layer, original_size):
        state["crop"] = tuple(crop_box)
        return process_crop(image, crop_box, layer, original_size)

    predictor.set_image = set_image
    predictor.predict_torch = predict_torch
    generator._process_crop = tracking_process_crop
    with torch.no_grad():
        return generator.generate(image)


def rle_of(record: dict) -> dict:
    counts = record["counts"]
    return {"size": list(record["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


@dataclasses.dataclass(frozen=True)
class Matching:
    official: int
    ours: int
    pairs: list[tuple[int, int, float]]  # (official index, our index, IoU) of pairs with IoU >= threshold

    @property
    def count_ratio(self) -> float:
        return self.ours / max(self.official, 1)

    @property
    def matched_fraction(self) -> float:
        return len(self.pairs) / max(self.official, 1)


def match(official_rles: list[dict], our_rles: list[dict], iou_min: float = 0.95) -> Matching:
    """One-to-one matching maximizing total IoU (Hungarian); pairs below ``iou_min`` do not count."""
    if not official_rles or not our_rles:
        return Matching(len(official_rles), len(our_rles), [])
    ious = np.asarray(coco_mask.iou([rle_of(r) for r in our_rles], [rle_of(r) for r in official_rles],
                                    [0] * len(official_rles))).T  # official x ours
    rows, cols = linear_sum_assignment(-ious)
    pairs = [(int(r), int(c), float(ious[r, c])) for r, c in zip(rows, cols, strict=True) if ious[r, c] >= iou_min]
    return Matching(len(official_rles), len(our_rles), pairs)
