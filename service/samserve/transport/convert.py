"""Proto <-> domain: API messages become validated domain objects, results become API messages.

Validation failures are :class:`samserve.core.errors.InvalidArgument` naming the request field at fault, so clients get
a ``google.rpc.BadRequest`` field violation (see :mod:`samserve.transport.interceptors`).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from samserve.core import model_spec
from samserve.core.api import pb
from samserve.core.errors import InvalidArgument, ResourceExhausted
from samserve.vision import amg, mask_encoding, processing, segmentation

LABELS = {
    pb.POINT_LABEL_BACKGROUND: model_spec.LABEL_BACKGROUND,
    pb.POINT_LABEL_FOREGROUND: model_spec.LABEL_FOREGROUND,
}
WANT_RLE = {pb.MASK_ENCODING_UNSPECIFIED, pb.MASK_ENCODING_RLE, pb.MASK_ENCODING_RLE_AND_PNG}
WANT_PNG = {pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_RLE_AND_PNG}


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def prompt_from_proto(
    message: Any, index: int, original_hw: tuple[int, int], meta: model_spec.ModelMetadata, max_points: int
) -> processing.Prompt:
    """Validate one API prompt against the image and model; InvalidArgument names the prompt and the field."""
    height, width = original_hw
    where = f"prompts[{index}]"
    if not message.points and not message.HasField("box"):
        raise InvalidArgument(f"{where} has neither points nor a box", field=where)
    if len(message.points) > max_points:
        raise InvalidArgument(f"{where} has {len(message.points)} points; the limit is {max_points}",
                              field=f"{where}.points")
    points = np.zeros((len(message.points), 2), dtype=np.float64)
    labels = np.zeros((len(message.points),), dtype=np.float64)
    for k, point in enumerate(message.points):
        field = f"{where}.points[{k}]"
        if not _finite(point.x, point.y):
            raise InvalidArgument(f"{field} is not finite", field=field)
        if not (0 <= point.x <= width and 0 <= point.y <= height):
            raise InvalidArgument(f"{field} ({point.x}, {point.y}) lies outside the {width}x{height} image",
                                  field=field)
        if point.label not in LABELS:
            raise InvalidArgument(f"{field}.label must be POINT_LABEL_FOREGROUND or POINT_LABEL_BACKGROUND",
                                  field=f"{field}.label")
        points[k] = (point.x, point.y)
        labels[k] = LABELS[point.label]
    box = None
    if message.HasField("box"):
        b = message.box
        if not _finite(b.x0, b.y0, b.x1, b.y1):
            raise InvalidArgument(f"{where}.box is not finite", field=f"{where}.box")
        if not (0 <= b.x0 <= b.x1 <= width and 0 <= b.y0 <= b.y1 <= height):
            raise InvalidArgument(f"{where}.box must satisfy 0 <= x0 <= x1 <= {width} and 0 <= y0 <= y1 <= {height}",
                                  field=f"{where}.box")
        box = np.array([b.x0, b.y0, b.x1, b.y1], dtype=np.float64)
    mask_input = None
    if message.HasField("mask_input"):
        expected = tuple(meta.low_res_mask_size)
        got = (message.mask_input.height, message.mask_input.width)
        if got != expected or len(message.mask_input.data) != expected[0] * expected[1] * 4:
            raise InvalidArgument(
                f"{where}.mask_input must be {expected[0]}x{expected[1]} float32 logits "
                f"({expected[0] * expected[1] * 4} bytes), "
                f"got {got[0]}x{got[1]} with {len(message.mask_input.data)} bytes",
                field=f"{where}.mask_input",
            )
        mask_input = np.frombuffer(message.mask_input.data, dtype="<f4").reshape(expected)
        if not np.all(np.isfinite(mask_input)):
            raise InvalidArgument(f"{where}.mask_input holds non-finite values", field=f"{where}.mask_input")
    return processing.Prompt(
        points=points if len(points) else None,
        labels=labels if len(labels) else None,
        box=box,
        mask_input=mask_input,
        multimask_output=message.multimask_output,
    )


def logits_to_proto(logits: np.ndarray) -> pb.LowResLogits:
    return pb.LowResLogits(height=logits.shape[0], width=logits.shape[1], data=logits.astype("<f4").tobytes())


EncodedMask = tuple[dict | None, bytes]
"""(COCO RLE or None, PNG bytes or b"") of one mask, as the request's encoding asks."""


class ResponseBudget:
    """Bytes of masks and logits a response may hold (``SAMSERVE_MAX_RESPONSE_BYTES``), spent as they are made
    (from the post-processing threads too): the first spend past the limit is RESOURCE_EXHAUSTED naming it, so
    an oversized answer stops early instead of being built."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spent = 0
        self._lock = threading.Lock()

    def spend(self, size: int) -> None:
        with self._lock:
            self.spent += size
            over = self.spent > self.max_bytes
        if over:
            raise ResourceExhausted(
                f"the answer would hold more than {self.max_bytes} bytes of masks and logits "
                "(SAMSERVE_MAX_RESPONSE_BYTES): send fewer prompts, ask for RLE only, or leave out the logits",
                quota="max_response_bytes")


def mask_encoder(encoding: int, budget: ResponseBudget) -> segmentation.Finish[EncodedMask]:
    """What Segment keeps of each full-size mask: its encodings (:func:`segmentation.segment_each`'s finish),
    charged to ``budget``."""
    want_rle, want_png = encoding in WANT_RLE, encoding in WANT_PNG

    def encode(mask: np.ndarray) -> EncodedMask:
        rle = mask_encoding.coco_rle(mask[None])[0] if want_rle else None
        png = mask_encoding.png(mask) if want_png else b""
        budget.spend(len(png) + (len(rle["counts"]) if rle is not None else 0))
        return rle, png

    return encode


def results_to_proto(answers: list[segmentation.PromptAnswer[EncodedMask]]) -> list[pb.PromptResult]:
    """The API's messages of finished answers (logits included where the answers kept them)."""
    results = []
    for answer in answers:
        masks = []
        for k, finished in enumerate(answer.masks):
            rle, png = finished.value
            message = pb.Mask(predicted_iou=float(answer.iou_predictions[k]),
                              stability_score=finished.stability_score, token_index=answer.token_indices[k],
                              area=finished.area, png=png)
            if rle is not None:
                message.rle.size[:] = rle["size"]
                message.rle.counts = rle["counts"]
            if answer.low_res_logits is not None:
                message.low_res_logits.CopyFrom(logits_to_proto(answer.low_res_logits[k]))
            masks.append(message)
        results.append(pb.PromptResult(masks=masks))
    return results


def amg_params_from_proto(request: pb.GenerateMasksRequest) -> amg.AmgParams:
    """The request's parameters; unset ones keep the official defaults (validated by AmgParams.validate)."""
    fields: dict[str, Any] = {name: getattr(request, name) for name in amg.SCALAR_PARAMETERS
                               if request.HasField(name)}
    if request.point_grids:
        grids = []
        for layer, grid in enumerate(request.point_grids):
            if len(grid.x) != len(grid.y):
                raise InvalidArgument(f"point_grids[{layer}] has {len(grid.x)} x and {len(grid.y)} y values",
                                      field=f"point_grids[{layer}]")
            grids.append(np.stack([np.asarray(grid.x, np.float64), np.asarray(grid.y, np.float64)], axis=1))
        fields["point_grids"] = tuple(grids)
        fields.setdefault("points_per_side", None)
    return amg.AmgParams(**fields)


def _xywh(box: np.ndarray) -> pb.BoxXYWH:
    x0, y0, x1, y1 = (float(v) for v in box)
    return pb.BoxXYWH(x=x0, y=y0, width=x1 - x0, height=y1 - y0)


def generated_masks_to_proto(masks: amg.MaskSet, original_hw: tuple[int, int], encoding: int) -> list[pb.GeneratedMask]:
    """The API records of every mask, field for field as the official ``generate`` returns them."""
    rles = masks.whole_frame_rles(original_hw)
    areas = mask_encoding.rle_areas(rles)
    records = []
    for k, rle in enumerate(rles):
        x, y = masks.points[k]
        record = pb.GeneratedMask(
            area=int(areas[k]), bbox=_xywh(masks.boxes[k]), predicted_iou=float(masks.predicted_iou[k]),
            point_coords=pb.Point(x=float(x), y=float(y), label=pb.POINT_LABEL_FOREGROUND),
            stability_score=float(masks.stability_score[k]), crop_box=_xywh(masks.crop_boxes[k]),
            png=mask_encoding.png(masks.mask(k, original_hw)) if encoding in WANT_PNG else b"",
        )
        if encoding in WANT_RLE:
            record.rle.size[:] = rle["size"]
            record.rle.counts = rle["counts"]
        records.append(record)
    return records


