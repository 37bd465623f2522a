"""Typed Python client of the samserve gateway (wraps the generated stubs; masks come back as numpy arrays).

    from samserve.client.typed_client import SamServeClient, PromptSpec
    with SamServeClient("127.0.0.1:50051") as client:
        embedded = client.embed(open("photo.jpg", "rb").read())
        (answer,) = client.segment(embedded.image_id, [PromptSpec(points=[(500, 375)], labels=[1])])
        best = answer.masks[answer.predicted_iou.argmax()]        # H x W bool
        everything = client.generate_masks(embedded.image_id, points_per_side=32)  # official generate() records

TLS, mutual TLS and the API key: ``SamServeClient(target, security=ClientSettings(token=..., ca_file=...))``
(fields not given come from SAMSERVE_CLIENT_* variables; see docs/security.md).

Reliability (on by default, :mod:`samserve.core.service_config`): every RPC is idempotent, so calls answered UNAVAILABLE
are retried by gRPC with exponential backoff (``ClientSettings.retry_attempts``, env
SAMSERVE_CLIENT_RETRY_ATTEMPTS, 5 attempts in all by default); a target of several gateways,
``SamServeClient("10.0.0.1:50051,10.0.0.2:50051")``, spreads calls round robin and rides out a rolling restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from samserve.client.interact import InteractSession
from samserve.client.masks import Masks, masks_from_proto, polygons_from_proto
from samserve.core.api import pb, pb_grpc
from samserve.core.settings import ClientSettings
from samserve.security.tls import client_channel
from samserve.vision import images, mask_encoding, polygons

FOREGROUND, BACKGROUND = 1, 0
_LABELS = {FOREGROUND: pb.POINT_LABEL_FOREGROUND, BACKGROUND: pb.POINT_LABEL_BACKGROUND}


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    image_id: str
    width: int
    height: int
    cached: bool
    model_id: str


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A prompt in original-image pixels: points (x, y) with labels 1 (foreground) / 0 (background), an
    optional XYXY box, optional low-res logits (h x w float32) from an earlier answer."""

    points: Sequence[tuple[float, float]] = ()
    labels: Sequence[int] = ()
    box: tuple[float, float, float, float] | None = None
    mask_input: np.ndarray | None = None
    multimask_output: bool = True

    def to_proto(self) -> pb.Prompt:
        if len(self.points) != len(self.labels):
            raise ValueError("points and labels must have the same length")
        message = pb.Prompt(
            points=[pb.Point(x=x, y=y, label=_LABELS.get(label, pb.POINT_LABEL_UNSPECIFIED))
                    for (x, y), label in zip(self.points, self.labels, strict=True)],
            multimask_output=self.multimask_output,
        )
        if self.box is not None:
            message.box.CopyFrom(pb.Box(x0=self.box[0], y0=self.box[1], x1=self.box[2], y1=self.box[3]))
        if self.mask_input is not None:
            logits = np.asarray(self.mask_input, dtype="<f4")
            message.mask_input.CopyFrom(pb.LowResLogits(height=logits.shape[0], width=logits.shape[1],
                                                        data=logits.tobytes()))
        return message


def annotation_from_proto(mask: pb.GeneratedMask) -> dict[str, Any]:
    """One GenerateMasks record in the official ``SamAutomaticMaskGenerator.generate`` layout (output_mode
    "coco_rle"): segmentation {"size": [H, W], "counts": str}, area, bbox XYWH, predicted_iou,
    point_coords [[x, y]], stability_score, crop_box XYWH. With polygons (MASK_ENCODING_POLYGON) segmentation is
    COCO's polygon list (the exterior rings), and ``rings`` (every ring: points, role, parent) and ``polygon_iou``
    are added; with neither RLE nor polygons in the response, segmentation is None."""
    box = lambda b: [b.x, b.y, b.width, b.height]  # noqa: E731
    segmentation: Any = None
    extra: dict[str, Any] = {}
    if mask.HasField("rle"):
        segmentation = {"size": list(mask.rle.size), "counts": mask.rle.counts.decode("ascii")}
    elif mask.HasField("polygons"):
        outline = polygons_from_proto(mask.polygons, 0, 0)
        segmentation = polygons.coco_segmentation(outline)
        extra = {"rings": [ring.to_json() for ring in outline.rings],
                 "polygon_iou": outline.iou, "polygon_tolerance_px": outline.tolerance_px}
    return {**extra,
        "segmentation": segmentation, "area": int(mask.area), "bbox": box(mask.bbox),
        "predicted_iou": mask.predicted_iou, "point_coords": [[mask.point_coords.x, mask.point_coords.y]],
        "stability_score": mask.stability_score, "crop_box": box(mask.crop_box),
    }


@dataclasses.dataclass(frozen=True)
class GeneratedMasks:
    """A GenerateMasks answer."""

    image_id: str
    width: int
    height: int
    cached: bool
    model_id: str
    annotations: list[dict[str, Any]]
    """In the official generator's layout and order (see :func:`annotation_from_proto`)."""

    def masks(self) -> np.ndarray:
        """bool, K x H x W."""
        if not self.annotations:
            return np.zeros((0, self.height, self.width), bool)
        return np.stack([self._mask(a) for a in self.annotations])

    def _mask(self, annotation: dict[str, Any]) -> np.ndarray:
        if "rings" in annotation:  # polygons: rasterised as the server measured their IoU
            rings = [polygons.Ring(r["points"], r["role"], r["parent"]) for r in annotation["rings"]]
            outline = polygons.PolygonSet(rings, 0, annotation["polygon_iou"], self.height, self.width)
            return polygons.polygons_to_mask(outline, self.height, self.width)
        segmentation = annotation["segmentation"]
        return mask_encoding.decode_rle(segmentation["size"], segmentation["counts"].encode())


IMAGE_ID_HEADER = "x-samserve-image-id"
"""Metadata naming the call's image: the gateway ignores it; a proxy may hash on it so that one image's calls reach
the same replica (its tier-1 cache), e.g. an L7 proxy's ring hash, or the chart's Ingress with
``ingress.upstreamHashBy: $http_x_samserve_image_id`` for clients that send it (docs/deploy.md)."""


def routing_metadata(image: bytes | str) -> tuple[tuple[str, str], ...]:
    """The :data:`IMAGE_ID_HEADER` of a call on ``image`` (encoded bytes, or an ``image_id``)."""
    return ((IMAGE_ID_HEADER, image if isinstance(image, str) else images.image_id(image)),)


class SamServeClient:
    """Blocking client; thread-safe (one channel). Errors raise ``grpc.RpcError`` with the API's status codes
    (after the retries of UNAVAILABLE). ``target``: ``host:port``, a comma-separated list of ``ip:port`` (round
    robin) or a gRPC URI (``dns:///gateways:50051``). ``security`` None: plaintext, no API key, default retries.
    Every call names its image in :data:`IMAGE_ID_HEADER` (for consistent hashing by a proxy)."""

    def __init__(self, target: str, timeout_s: float | None = 600.0, security: ClientSettings | None = None) -> None:
        self.channel = client_channel(target, **(security.model_dump() if security else {}),
                                      options=[("grpc.max_receive_message_length", 1 << 30)])
        self.stub = pb_grpc.SegmentAnythingStub(self.channel)
        self.timeout_s = timeout_s

    def embed(self, image: bytes) -> EmbedResult:
        response = self.stub.Embed(pb.EmbedRequest(image=image), timeout=self.timeout_s,
                                   metadata=routing_metadata(image))
        return EmbedResult(response.image_id, response.width, response.height, response.cached, response.model_id)

    def segment_raw(self, request: pb.SegmentRequest) -> pb.SegmentResponse:
        image = request.image_id if request.WhichOneof("image") == "image_id" else request.image_bytes
        return self.stub.Segment(request, timeout=self.timeout_s, metadata=routing_metadata(image))

    def segment(
        self,
        image: bytes | str,
        prompts: Sequence[PromptSpec],
        encoding: pb.MaskEncoding = pb.MASK_ENCODING_RLE,
        return_low_res_logits: bool = False,
        polygon_tolerance_px: float | None = None,
    ) -> list[Masks]:
        """Masks per prompt. ``image``: encoded bytes, or an ``image_id`` string from :meth:`embed`.
        ``encoding`` MASK_ENCODING_POLYGON: each answer's ``polygons``, simplified to ``polygon_tolerance_px``
        (None: the server's default, 1 px)."""
        request = pb.SegmentRequest(
            prompts=[p.to_proto() for p in prompts], mask_encoding=encoding,
            return_low_res_logits=return_low_res_logits, polygon_tolerance_px=polygon_tolerance_px,
        )
        if isinstance(image, str):
            request.image_id = image
        else:
            request.image_bytes = image
        response = self.segment_raw(request)
        return [masks_from_proto(r, response.height, response.width) for r in response.results]

    def generate_masks(
        self, image: bytes | str, point_grids: Sequence[np.ndarray] | None = None, timeout_s: float | None = None,
        **params: float | int,
    ) -> GeneratedMasks:
        """Segment everything. ``params``: the official generator's parameters by name (points_per_side,
        pred_iou_thresh, crop_n_layers, min_mask_region_area, ...); unset ones keep its defaults.
        ``point_grids``: per crop layer, G x 2 (x, y) in [0, 1] (instead of points_per_side)."""
        request = pb.GenerateMasksRequest(mask_encoding=pb.MASK_ENCODING_RLE)
        for name, value in params.items():  # mask_encoding and polygon_tolerance_px included
            setattr(request, name, value)
        for grid in point_grids or ():
            grid = np.asarray(grid, dtype=np.float64)
            request.point_grids.add(x=grid[:, 0].tolist(), y=grid[:, 1].tolist())
        if isinstance(image, str):
            request.image_id = image
        else:
            request.image_bytes = image
        response = self.stub.GenerateMasks(request, timeout=timeout_s or self.timeout_s,
                                           metadata=routing_metadata(image))
        return GeneratedMasks(response.image_id, response.width, response.height, response.cached,
                              response.model_id, [annotation_from_proto(m) for m in response.masks])

    def interact(self, image: bytes | str, encoding: pb.MaskEncoding = pb.MASK_ENCODING_RLE,
                 polygon_tolerance_px: float | None = None, timeout_s: float | None = None) -> InteractSession:
        """Open an interactive session on ``image`` (encoded bytes, or an ``image_id``):
        :class:`samserve.client.interact.InteractSession`. ``timeout_s``: the whole session's deadline (None: the
        gateway's idle timeout alone ends it)."""
        opening = pb.InteractOpen(mask_encoding=encoding, polygon_tolerance_px=polygon_tolerance_px)
        if isinstance(image, str):
            opening.image_id = image
        else:
            opening.image_bytes = image
        return InteractSession(self.stub, opening, timeout_s, routing_metadata(image))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SamServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
