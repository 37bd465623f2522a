"""Mask quality on held-out generated scenes, measured with the official ``SamPredictor`` (the reference).

For every object of every scene (seeds ``EVAL_SEED_OFFSET + i``, never drawn in training):

* ``point_top``: one foreground point at the object's interior point farthest from its boundary, multimask
  output, the mask with the highest predicted IoU;
* ``point_oracle``: the same prompt, the best of the 3 masks;
* ``box``: the object's tight box, single-mask output;
* ``interactive_3``: the first point, then two more clicks, each at the centre (farthest interior point) of the
  largest error region of the previous mask, labelled foreground if it was missed and background otherwise, with
  the previous low-res logits fed back as the mask prompt;
* ``iou_pearson``: Pearson correlation of predicted IoU and true IoU over all 3 multimask outputs.

IoU is computed on the original image's pixels. The same prompts (:func:`object_prompts`) drive the end-to-end
test through the service, so both measure the same thing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from tqdm import tqdm

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core import model_spec
from samserve_build import architectures, clicks, scenes

QUALITY_TARGETS = {
    "miou_point_top": 0.80,
    "miou_point_oracle": 0.88,
    "miou_box": 0.90,
    "miou_interactive_3": 0.90,
    "iou_pearson": 0.5,
}
"""What the shipped model must reach on >= 500 held-out scenes (issue 4)."""
SIZE_BUCKETS = ((0, 32 ** 2, "small"), (32 ** 2, 96 ** 2, "medium"), (96 ** 2, float("inf"), "large"))
"""COCO's object-size buckets by visible area in pixels."""


@dataclasses.dataclass(frozen=True)
class ObjectPrompts:
    point: tuple[float, float]
    """(x, y) original-image pixels."""
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) inclusive pixel indices."""


def object_prompts(instance: scenes.Instance) -> ObjectPrompts:
    return ObjectPrompts(scenes.farthest_interior_point(instance.mask), scenes.tight_box(instance.mask))


def iou(predicted: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(predicted, target).sum()
    return float(np.logical_and(predicted, target).sum() / union) if union else 1.0


@dataclasses.dataclass
class QualityReport:
    """Per-object results (parallel lists) and their summary."""

    point_top: list[float] = dataclasses.field(default_factory=list)
    point_oracle: list[float] = dataclasses.field(default_factory=list)
    box: list[float] = dataclasses.field(default_factory=list)
    interactive_3: list[float] = dataclasses.field(default_factory=list)
    areas: list[int] = dataclasses.field(default_factory=list)
    predicted_iou: list[float] = dataclasses.field(default_factory=list)
    true_iou: list[float] = dataclasses.field(default_factory=list)
    scenes: int = 0

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"scenes": self.scenes, "objects": len(self.point_top)}
        for name in ("point_top", "point_oracle", "box", "interactive_3"):
            values = getattr(self, name)
            if values:
                out[f"miou_{name}"] = round(float(np.mean(values)), 4)
        if len(self.predicted_iou) > 2 and np.std(self.predicted_iou) > 0 and np.std(self.true_iou) > 0:
            out["iou_pearson"] = round(float(np.corrcoef(self.predicted_iou, self.true_iou)[0, 1]), 4)
        return out

    def by_size(self) -> dict[str, dict[str, float | int]]:
        areas = np.asarray(self.areas)
        table = {}
        for low, high, name in SIZE_BUCKETS:
            chosen = (areas >= low) & (areas < high)
            row: dict[str, float | int] = {"objects": int(chosen.sum())}
            for metric in ("point_top", "point_oracle", "box", "interactive_3"):
                values = np.asarray(getattr(self, metric))
                if values.size and chosen.any():
                    row[f"miou_{metric}"] = round(float(values[chosen].mean()), 4)
            table[name] = row
        return table


class Segmenter(Protocol):
    """What the evaluation asks of a model: one image at a time, SamPredictor's semantics and layouts."""

    def set_image(self, image: np.ndarray) -> None:
        """``image``: H x W x 3 uint8 RGB."""

    def predict(self, points: list[tuple[float, float]] | None, labels: list[int] | None,
                box: tuple[float, float, float, float] | None, mask_input: np.ndarray | None,
                multimask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (K x H x W bool masks, K predicted IoUs, K x h x w low-res logits); K = 3 or 1."""


class PredictorSegmenter:
    """The reference: the official ``SamPredictor``."""

    def __init__(self, sam: Sam) -> None:
        self.predictor = SamPredictor(sam)

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def predict(self, points: list[tuple[float, float]] | None, labels: list[int] | None,
                box: tuple[float, float, float, float] | None, mask_input: np.ndarray | None,
                multimask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.predictor.predict(
            point_coords=None if points is None else np.array(points),
            point_labels=None if labels is None else np.array(labels),
            box=None if box is None else np.array(box), mask_input=None if mask_input is None else mask_input[None],
            multimask_output=multimask)


class ServiceSegmenter:
    """The service: the image is sent once as PNG (``Embed``), every prompt is a ``Segment`` call, masks come back
    as COCO RLE decoded by pycocotools, low-res logits are asked for (the interactive rounds feed them back)."""

    def __init__(self, client: SamServeClient) -> None:
        self.client = client
        self.image_id = ""
        self.height = self.width = 0

    def set_image(self, image: np.ndarray) -> None:
        self.height, self.width = image.shape[:2]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        self.image_id = self.client.embed(buffer.getvalue()).image_id

    def predict(self, points: list[tuple[float, float]] | None, labels: list[int] | None,
                box: tuple[float, float, float, float] | None, mask_input: np.ndarray | None,
                multimask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prompt = PromptSpec(points=points or (), labels=labels or (), box=box, mask_input=mask_input,
                            multimask_output=multimask)
        (answer,) = self.client.segment(self.image_id, [prompt], return_low_res_logits=True)
        if answer.low_res_logits is None:
            raise RuntimeError("the service answered without the low-res logits it was asked for")
        return answer.masks, answer.predicted_iou, answer.low_res_logits


def evaluate(segmenter: Segmenter, scene_indices: Iterable[int], seed_offset: int = scenes.EVAL_SEED_OFFSET,
             interactive: bool = True, progress: bool = False) -> QualityReport:
    """Evaluate on the scenes ``seed_offset + i`` (see the module docstring for the prompts)."""
    report = QualityReport()
    indices = list(scene_indices)
    for index in tqdm(indices, desc="evaluating", unit="scene", disable=not progress):
        scene = scenes.generate_scene(seed_offset + index)
        segmenter.set_image(scene.image)
        report.scenes += 1
        for instance in scene.instances:
            prompts = object_prompts(instance)
            report.areas.append(instance.area)
            masks, scores, low_res = segmenter.predict([prompts.point], [model_spec.LABEL_FOREGROUND], None, None, True)
            ious = [iou(mask, instance.mask) for mask in masks]
            top = int(np.argmax(scores))
            report.point_top.append(ious[top])
            report.point_oracle.append(max(ious))
            report.predicted_iou.extend(float(s) for s in scores)
            report.true_iou.extend(ious)
            box_masks, _, _ = segmenter.predict(None, None, prompts.box, None, False)
            report.box.append(iou(box_masks[0], instance.mask))
            if interactive:
                report.interactive_3.append(_interactive(segmenter, instance.mask, prompts, masks[top], low_res[top]))
    return report


def evaluate_torch(sam: Sam, scene_indices: Iterable[int], seed_offset: int = scenes.EVAL_SEED_OFFSET,
                   interactive: bool = True, progress: bool = False) -> QualityReport:
    """:func:`evaluate` with the official predictor."""
    return evaluate(PredictorSegmenter(sam), scene_indices, seed_offset, interactive, progress)


def _interactive(segmenter: Segmenter, target: np.ndarray, prompts: ObjectPrompts, mask: np.ndarray,
                 low_res: np.ndarray, click_count: int = 3) -> float:
    points, labels = [prompts.point], [model_spec.LABEL_FOREGROUND]
    for _ in range(click_count - 1):
        x, y, label = clicks.error_point(mask, target, None)
        points.append((x, y))
        labels.append(int(label))
        masks, _, lows = segmenter.predict(points, labels, None, low_res, False)
        mask, low_res = masks[0], lows[0]
    return iou(mask, target)


def write_quality_table(checkpoint: Path, scene_count: int, out: Path | None) -> dict[str, Any]:
    """Evaluate a checkpoint (architecture JSON beside it) on held-out scenes 0..N-1; write the table as JSON."""
    checkpoint = Path(checkpoint)
    sam = architectures.load_sam("custom", checkpoint)
    started = time.perf_counter()
    report = evaluate_torch(sam, range(scene_count), progress=True)
    summary = report.summary()
    table = {
        "checkpoint": checkpoint.name,
        "weights_sha256": architectures.sha256_file(checkpoint),
        "held_out_seeds": f"{scenes.EVAL_SEED_OFFSET} + [0, {scene_count})",
        "reference": "official segment_anything.SamPredictor",
        "summary": summary,
        "by_size": report.by_size(),
        "targets": {name: {"target": target, "value": summary.get(name),
                           "met": summary.get(name) is not None and summary[name] >= target}
                    for name, target in QUALITY_TARGETS.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.processor() or platform.machine(),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2) + "\n")
    return table
