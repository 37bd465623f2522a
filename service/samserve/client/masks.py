"""The answer to one prompt as numpy arrays (:class:`Masks`), from the API's messages."""

from __future__ import annotations

import dataclasses

import numpy as np

from samserve.core.api import pb
from samserve.vision import mask_encoding, polygons


@dataclasses.dataclass(frozen=True)
class Masks:
    """The answer to one prompt, in mask-token order."""

    masks: np.ndarray
    """bool, K x H x W."""
    predicted_iou: np.ndarray
    """float32, K."""
    stability_score: np.ndarray
    """float32, K."""
    token_index: list[int]
    low_res_logits: np.ndarray | None
    """float32, K x h x w when asked for."""
    polygons: list[polygons.PolygonSet] | None = None
    """Per mask, when MASK_ENCODING_POLYGON was asked for (``masks`` is then these polygons rasterised)."""


def polygons_from_proto(message: pb.Polygons, height: int, width: int) -> polygons.PolygonSet:
    """A Polygons message as :class:`samserve.vision.polygons.PolygonSet` (rings with roles and parents)."""
    roles = {pb.RING_ROLE_EXTERIOR: "exterior", pb.RING_ROLE_INTERIOR: "interior"}
    rings = [polygons.Ring(list(ring.points), roles[ring.role],  # type: ignore[arg-type]
                           None if ring.parent < 0 else ring.parent) for ring in message.rings]
    return polygons.PolygonSet(rings, message.dropped_parts, message.iou, height, width, message.tolerance_px)


def masks_from_proto(result: pb.PromptResult, height: int, width: int) -> Masks:
    decoded = []
    outlines = [polygons_from_proto(m.polygons, height, width) for m in result.masks if m.HasField("polygons")]
    for k, mask in enumerate(result.masks):
        if mask.HasField("rle"):
            decoded.append(mask_encoding.decode_rle(list(mask.rle.size), mask.rle.counts))
        elif mask.png:
            decoded.append(mask_encoding.decode_png(mask.png))
        else:
            decoded.append(polygons.polygons_to_mask(outlines[k], height, width))
    logits = None
    if result.masks and result.masks[0].HasField("low_res_logits"):
        logits = np.stack([
            np.frombuffer(m.low_res_logits.data, "<f4").reshape(m.low_res_logits.height, m.low_res_logits.width)
            for m in result.masks
        ])
    return Masks(
        masks=np.stack(decoded) if decoded else np.zeros((0, height, width), bool),
        predicted_iou=np.array([m.predicted_iou for m in result.masks], np.float32),
        stability_score=np.array([m.stability_score for m in result.masks], np.float32),
        token_index=[m.token_index for m in result.masks],
        low_res_logits=logits,
        polygons=outlines or None,
    )
