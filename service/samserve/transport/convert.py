"""Proto <-> domain: API messages become validated domain objects, results become API messages.

Validation failures are :class:`samserve.core.errors.InvalidArgument` naming the request field at fault, so clients get
a ``google.rpc.BadRequest`` field violation (see :mod:`samserve.transport.interceptors`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np

from samserve.core import model_spec
from samserve.core.api import pb
from samserve.core.errors import InvalidArgument, ResourceExhausted
from samserve.vision import amg, interaction, mask_encoding, polygons, processing, segmentation

LABELS = {
    pb.POINT_LABEL_BACKGROUND: model_spec.LABEL_BACKGROUND,
    pb.POINT_LABEL_FOREGROUND: model_spec.LABEL_FOREGROUND,
}
WANT_RLE = {pb.MASK_ENCODING_UNSPECIFIED, pb.MASK_ENCODING_RLE, pb.MASK_ENCODING_RLE_AND_PNG}
WANT_PNG = {pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_RLE_AND_PNG}
WANT_POLYGONS = {pb.MASK_ENCODING_POLYGON}
RING_ROLES = {"exterior": pb.RING_ROLE_EXTERIOR, "interior": pb.RING_ROLE_INTERIOR}


@dataclasses.dataclass(frozen=True)
class MaskEncoding:
    """What a request asks each mask to be sent as (its ``mask_encoding`` and ``polygon_tolerance_px``)."""

    rle: bool
    png: bool
    polygon_tolerance_px: float | None
    """None: no polygons."""

    @classmethod
    def of(cls, request: pb.SegmentRequest | pb.GenerateMasksRequest | pb.InteractOpen) -> MaskEncoding:
        """The request's encoding; a bad tolerance is InvalidArgument naming ``polygon_tolerance_px`` (whatever the
        encoding asked for: a client that sends one means it)."""
        tolerance = polygons.DEFAULT_TOLERANCE_PX
        if request.HasField(polygons.TOLERANCE_FIELD):
            tolerance = polygons.validate_tolerance(request.polygon_tolerance_px)
        if request.mask_encoding not in WANT_RLE | WANT_PNG | WANT_POLYGONS:
            raise InvalidArgument(f"mask_encoding {request.mask_encoding} is not one of MaskEncoding's values",
                                  field="mask_encoding")
        return cls(request.mask_encoding in WANT_RLE, request.mask_encoding in WANT_PNG,
                   tolerance if request.mask_encoding in WANT_POLYGONS else None)

    def polygons(self, mask: np.ndarray) -> pb.Polygons | None:
        """The Polygons message of an H x W bool mask, when asked for."""
        if self.polygon_tolerance_px is None:
            return None
        found = polygons.mask_to_polygons(mask, self.polygon_tolerance_px)
        return pb.Polygons(
            rings=[pb.PolygonRing(points=ring.points, role=RING_ROLES[ring.role],
                                  parent=-1 if ring.parent is None else ring.parent) for ring in found.rings],
            iou=found.iou, tolerance_px=found.tolerance_px, dropped_parts=found.dropped_parts)


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


@dataclasses.dataclass(frozen=True)
class EncodedMask:
    """One mask as the request's encoding asks: COCO RLE, PNG bytes, polygons (each None or b"" when not asked)."""

    rle: dict | None
    png: bytes
    polygons: pb.Polygons | None


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


def mask_encoder(encoding: MaskEncoding, budget: ResponseBudget) -> segmentation.Finish[EncodedMask]:
    """What Segment keeps of each full-size mask: its encodings (:func:`segmentation.segment_each`'s finish),
    charged to ``budget``."""

    def encode(mask: np.ndarray) -> EncodedMask:
        rle = mask_encoding.coco_rle(mask[None])[0] if encoding.rle else None
        png = mask_encoding.png(mask) if encoding.png else b""
        outlines = encoding.polygons(mask)
        budget.spend(len(png) + (len(rle["counts"]) if rle is not None else 0)
                     + (outlines.ByteSize() if outlines is not None else 0))
        return EncodedMask(rle, png, outlines)

    return encode


def results_to_proto(answers: list[segmentation.PromptAnswer[EncodedMask]]) -> list[pb.PromptResult]:
    """The API's messages of finished answers (logits included where the answers kept them)."""
    results = []
    for answer in answers:
        masks = []
        for k, finished in enumerate(answer.masks):
            encoded = finished.value
            message = pb.Mask(predicted_iou=float(answer.iou_predictions[k]),
                              stability_score=finished.stability_score, token_index=answer.token_indices[k],
                              area=finished.area, png=encoded.png, polygons=encoded.polygons)
            if encoded.rle is not None:
                message.rle.size[:] = encoded.rle["size"]
                message.rle.counts = encoded.rle["counts"]
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


def generated_masks_to_proto(masks: amg.MaskSet, original_hw: tuple[int, int],
                             encoding: MaskEncoding) -> list[pb.GeneratedMask]:
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
            png=mask_encoding.png(masks.mask(k, original_hw)) if encoding.png else b"",
            polygons=encoding.polygons(masks.mask(k, original_hw)),
        )
        if encoding.rle:
            record.rle.size[:] = rle["size"]
            record.rle.counts = rle["counts"]
        records.append(record)
    return records




INTERACT_ACTIONS = {action.value: action for action in interaction.Action}
"""``InteractEvent.action`` field name -> the session's action."""


def event_from_proto(request: pb.InteractRequest, original_hw: tuple[int, int]) -> interaction.Event:
    """One event of a session, validated against the image (coordinates as Segment's prompts); InvalidArgument
    names the event (``events[id=7].add_point``)."""
    if request.WhichOneof("kind") != "event":
        raise InvalidArgument("`open` comes once, as the first message of a session; later messages are events",
                              field="open")
    message = request.event
    which = message.WhichOneof("action")
    if which is None:
        raise InvalidArgument(f"event {message.id} has no action", field=f"events[id={message.id}]")
    event = interaction.Event(message.id, INTERACT_ACTIONS[which])
    height, width = original_hw
    if which == "add_point":
        point = message.add_point
        if not (_finite(point.x, point.y) and 0 <= point.x <= width and 0 <= point.y <= height):
            raise InvalidArgument(f"{event.field} ({point.x}, {point.y}) lies outside the {width}x{height} image",
                                  field=event.field)
        if point.label not in LABELS:
            raise InvalidArgument(f"{event.field}.label must be POINT_LABEL_FOREGROUND or POINT_LABEL_BACKGROUND",
                                  field=f"{event.field}.label")
        return dataclasses.replace(event, point=(point.x, point.y, LABELS[point.label]))
    if which == "set_box":
        b = message.set_box
        if not (_finite(b.x0, b.y0, b.x1, b.y1) and 0 <= b.x0 <= b.x1 <= width and 0 <= b.y0 <= b.y1 <= height):
            raise InvalidArgument(f"{event.field} must satisfy 0 <= x0 <= x1 <= {width} and 0 <= y0 <= y1 <= "
                                  f"{height}", field=event.field)
        return dataclasses.replace(event, box=(b.x0, b.y0, b.x1, b.y1))
    if which == "choose_mask":
        return dataclasses.replace(event, token=message.choose_mask)  # the session checks it against the model
    return event


def decoded_from_answer(answer: segmentation.PromptAnswer[EncodedMask]) -> interaction.Decoded[pb.Mask]:
    """A session's decoded state: the answer's masks as API messages (without logits: the session keeps them)."""
    assert answer.low_res_logits is not None
    masks = results_to_proto([dataclasses.replace(answer, low_res_logits=None)])[0].masks
    return interaction.Decoded(list(masks), answer.iou_predictions, answer.low_res_logits, answer.token_indices)


def interact_answer(event_id: int, state: interaction.State[pb.Mask], decoded_now: bool,
                    finished: bool) -> pb.InteractResponse:
    """The answer to a session's newest event: the state's masks and the one shown."""
    masks = state.decoded.masks if state.decoded is not None else []
    return pb.InteractResponse(answer=pb.InteractAnswer(
        event_id=event_id, masks=masks, chosen=state.shown() if masks else 0, decoded=decoded_now,
        points=len(state.points), finished=finished))


def interact_superseded(event_ids: list[int]) -> pb.InteractResponse:
    return pb.InteractResponse(superseded=pb.InteractSuperseded(event_ids=event_ids))
