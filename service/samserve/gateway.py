"""The gRPC gateway: ``samserve.v1.SegmentAnything`` (Embed, Segment), health checking and reflection.

Decodes images, computes each image's embedding once (through :class:`samserve.cache.EmbeddingCache`) and
answers prompts from the cached embedding. Health is SERVING only while Triton's SAM models are ready; the
served model's metadata (sizes, weights digest) is read from Triton whenever it becomes ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from samserve import __version__, amg, images, mask_encoding, metrics, model_spec, processing, segmentation
from samserve.api import SERVICE_NAME, pb, pb_grpc
from samserve.cache import CacheEntry, Embedding, EmbeddingCache
from samserve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, grpc_errors
from samserve.settings import Settings
from samserve.triton_models import TritonSam

LOG = logging.getLogger(__name__)
LABELS = {pb.POINT_LABEL_BACKGROUND: model_spec.LABEL_BACKGROUND, pb.POINT_LABEL_FOREGROUND: model_spec.LABEL_FOREGROUND}
WANT_RLE = {pb.MASK_ENCODING_UNSPECIFIED, pb.MASK_ENCODING_RLE, pb.MASK_ENCODING_RLE_AND_PNG}
WANT_PNG = {pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_RLE_AND_PNG}


class EncodeLimiter:
    """At most ``concurrent`` encoder calls in flight and ``queued`` waiting; beyond that RESOURCE_EXHAUSTED."""

    def __init__(self, concurrent: int, queued: int) -> None:
        self._slots = asyncio.Semaphore(concurrent)
        self.queued_limit = queued
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.queued_limit:
            raise ResourceExhausted(f"{self.waiting} image encodes are already queued; retry later")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


@dataclasses.dataclass
class ServedModel:
    """The model Triton serves now and the cache of its embeddings."""

    meta: model_spec.ModelMetadata
    cache: EmbeddingCache


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def prompt_from_proto(
    message: Any, index: int, original_hw: tuple[int, int], meta: model_spec.ModelMetadata, max_points: int
) -> processing.Prompt:
    """Validate one API prompt against the image and model; InvalidArgument names the prompt and the field."""
    height, width = original_hw
    where = f"prompts[{index}]"
    if not message.points and not message.HasField("box"):
        raise InvalidArgument(f"{where} has neither points nor a box")
    if len(message.points) > max_points:
        raise InvalidArgument(f"{where} has {len(message.points)} points; the limit is {max_points}")
    points = np.zeros((len(message.points), 2), dtype=np.float64)
    labels = np.zeros((len(message.points),), dtype=np.float64)
    for k, point in enumerate(message.points):
        if not _finite(point.x, point.y):
            raise InvalidArgument(f"{where}.points[{k}] is not finite")
        if not (0 <= point.x <= width and 0 <= point.y <= height):
            raise InvalidArgument(f"{where}.points[{k}] ({point.x}, {point.y}) lies outside the {width}x{height} image")
        if point.label not in LABELS:
            raise InvalidArgument(f"{where}.points[{k}].label must be POINT_LABEL_FOREGROUND or POINT_LABEL_BACKGROUND")
        points[k] = (point.x, point.y)
        labels[k] = LABELS[point.label]
    box = None
    if message.HasField("box"):
        b = message.box
        if not _finite(b.x0, b.y0, b.x1, b.y1):
            raise InvalidArgument(f"{where}.box is not finite")
        if not (0 <= b.x0 <= b.x1 <= width and 0 <= b.y0 <= b.y1 <= height):
            raise InvalidArgument(f"{where}.box must satisfy 0 <= x0 <= x1 <= {width} and 0 <= y0 <= y1 <= {height}")
        box = np.array([b.x0, b.y0, b.x1, b.y1], dtype=np.float64)
    mask_input = None
    if message.HasField("mask_input"):
        expected = tuple(meta.low_res_mask_size)
        got = (message.mask_input.height, message.mask_input.width)
        if got != expected or len(message.mask_input.data) != expected[0] * expected[1] * 4:
            raise InvalidArgument(
                f"{where}.mask_input must be {expected[0]}x{expected[1]} float32 logits "
                f"({expected[0] * expected[1] * 4} bytes), got {got[0]}x{got[1]} with {len(message.mask_input.data)} bytes"
            )
        mask_input = np.frombuffer(message.mask_input.data, dtype="<f4").reshape(expected)
        if not np.all(np.isfinite(mask_input)):
            raise InvalidArgument(f"{where}.mask_input holds non-finite values")
    return processing.Prompt(
        points=points if len(points) else None,
        labels=labels if len(labels) else None,
        box=box,
        mask_input=mask_input,
        multimask_output=message.multimask_output,
    )


def logits_to_proto(logits: np.ndarray) -> pb.LowResLogits:
    return pb.LowResLogits(height=logits.shape[0], width=logits.shape[1], data=logits.astype("<f4").tobytes())


def _encode_mask(mask: np.ndarray, encoding: int) -> tuple[dict | None, bytes]:
    """(COCO RLE or None, PNG bytes or b"") of one H x W bool mask, as the request's encoding asks."""
    rle = mask_encoding.coco_rle(mask[None])[0] if encoding in WANT_RLE else None
    return rle, mask_encoding.png(mask) if encoding in WANT_PNG else b""


async def results_to_proto(
    results: list[segmentation.PromptMasks], encoding: int, with_logits: bool
) -> list[pb.PromptResult]:
    """Encode every mask (on the post-processing threads when there is enough work) into the API's messages."""
    masks = [mask for result in results for mask in result.masks]
    encoded = await segmentation.map_in_pool(
        lambda mask: _encode_mask(mask, encoding), masks, masks[0].size if masks else 0
    )
    answers, position = [], 0
    for result in results:
        areas = processing.mask_areas(result.masks)
        masks = []
        for k in range(len(result.masks)):
            rle, png = encoded[position]
            position += 1
            message = pb.Mask(
                predicted_iou=float(result.iou_predictions[k]),
                stability_score=float(result.stability_scores[k]),
                token_index=result.token_indices[k],
                area=int(areas[k]),
                png=png,
            )
            if rle is not None:
                message.rle.size[:] = rle["size"]
                message.rle.counts = rle["counts"]
            if with_logits:
                message.low_res_logits.CopyFrom(logits_to_proto(result.low_res_logits[k]))
            masks.append(message)
        answers.append(pb.PromptResult(masks=masks))
    return answers


class Gateway(pb_grpc.SegmentAnythingServicer):
    """The servicer. Triton client, Redis client and settings are injected."""

    def __init__(self, settings: Settings, triton: TritonSam, redis: Any | None = None) -> None:
        self.settings = settings
        self.triton = triton
        self.redis = redis
        self.health = health.aio.HealthServicer()
        self.limiter = EncodeLimiter(settings.max_concurrent_encodes, settings.max_queued_encodes)
        self.model: ServedModel | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._set_health(False)
        self._watcher = asyncio.create_task(self._watch_triton(), name="watch-triton")

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch_triton(self) -> None:
        """Keep health and the served model's metadata in step with Triton."""
        was_ready = None
        while True:
            ready = await self.triton.models_ready()
            if ready:
                try:
                    meta = await self.triton.metadata()
                    # A new model, or Triton back after an outage: it forgot the shared-memory regions that
                    # tier 1 staged, so tier 1 starts afresh (tier 2 still has the embeddings).
                    if self.model is None or self.model.meta != meta or was_ready is False:
                        await self._use_model(meta)
                except Exception as error:  # noqa: BLE001 - metadata unreadable means not ready
                    LOG.warning("cannot read the served model's metadata: %s", error)
                    ready = False
            if ready != was_ready:
                LOG.info("Triton models %s", "ready: SERVING" if ready else "not ready: NOT_SERVING")
                await self._set_health(ready)
                was_ready = ready
            if ready:
                self._ready.set()
            else:
                self._ready.clear()
            await asyncio.sleep(self.settings.health_check_interval_s)

    async def _use_model(self, meta: model_spec.ModelMetadata) -> None:
        if self.model is not None:
            await self.model.cache.close()
        await self.triton.forget_output_regions()
        cache = EmbeddingCache(
            self.triton, meta.cache_namespace, self.settings.l1_cache_bytes, self.redis,
            ttl_s=self.settings.redis_ttl_s, redis_timeout_s=self.settings.redis_timeout_s,
            lock_ttl_s=self.settings.redis_lock_ttl_s, failure_log_interval_s=self.settings.failure_log_interval_s,
        )
        self.model = ServedModel(meta, cache)
        metrics.set_build_info(__version__, meta.model_id, meta.weights_sha256)
        LOG.info("serving %s (weights %s..., %d px, embedding %s)", meta.model_id, meta.weights_sha256[:12],
                 meta.image_size, "x".join(map(str, meta.embedding_shape)))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.model is not None:
            await self.model.cache.close()
        await self.triton.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    # -- helpers ------------------------------------------------------------------------------------------
    def _served(self) -> ServedModel:
        if self.model is None or not self._ready.is_set():
            raise Unavailable("Triton's SAM models are not ready")
        return self.model

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.settings.triton_timeout_s if remaining is None else min(remaining, self.settings.triton_timeout_s)

    async def _embedding(
        self, model: ServedModel, image_id: str, source: ImageSource | None, context: grpc.aio.ServicerContext,
        crop: amg.CropBox | None = None,
    ) -> tuple[CacheEntry, bool]:
        """(entry, cached) of the image (or of one crop of it) from the cache, computed from ``source`` on a miss;
        NotFound when only the id is known and the cache lacks it. Release the entry when done."""
        key = image_id if crop is None else crop_id(image_id, crop)
        if source is None:
            found = await model.cache.get(key)
            if found is None:
                what = "image_id" if crop is None else f"crop {crop} of image_id"
                raise NotFound(f"{what} {image_id} is unknown or expired; send the image bytes again")
            return found, True

        async def compute() -> Embedding:
            pixels = await source.pixels()
            if crop is not None:
                x0, y0, x1, y1 = crop
                pixels = pixels[y0:y1, x0:x1]
            prepared = await asyncio.to_thread(processing.prepare_image, pixels, model.meta.image_size)
            async with self.limiter.slot():
                array = await self.triton.encode(prepared, self._timeout(context))
            return Embedding(array, prepared.original_size, prepared.input_size)

        return await model.cache.get_or_compute(key, compute)

    def _source(self, data: bytes) -> tuple[str, ImageSource]:
        if not data:
            raise InvalidArgument("empty image")
        metrics.IMAGE_BYTES.observe(len(data))
        return images.image_id(data), ImageSource(data, self.settings.max_image_pixels)

    async def _request_image(
        self, model: ServedModel, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[CacheEntry, bool, str, ImageSource | None]:
        """The whole image's cache entry for a request with ``oneof image {image_bytes, image_id}``."""
        which = request.WhichOneof("image")
        if which == "image_bytes":
            image_id, source = self._source(request.image_bytes)
        elif which == "image_id":
            image_id, source = request.image_id, None
        else:
            raise InvalidArgument("set image_bytes or image_id")
        entry, cached = await self._embedding(model, image_id, source, context)
        return entry, cached, image_id, source

    # -- RPCs ---------------------------------------------------------------------------------------------
    @grpc_errors
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        model = self._served()
        image_id, source = self._source(request.image)
        entry, cached = await self._embedding(model, image_id, source, context)
        try:
            height, width = entry.embedding.original_size
            return pb.EmbedResponse(image_id=image_id, width=width, height=height, cached=cached,
                                    model_id=model.meta.model_id)
        finally:
            await model.cache.release(entry)

    @grpc_errors
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        model = self._served()
        if not request.prompts:
            raise InvalidArgument("a Segment request needs at least one prompt")
        if len(request.prompts) > self.settings.max_prompts:
            raise InvalidArgument(f"{len(request.prompts)} prompts; the limit is {self.settings.max_prompts}")
        entry, cached, image_id, _ = await self._request_image(model, request, context)
        try:
            original = entry.embedding.original_size
            prompts = [
                prompt_from_proto(p, i, original, model.meta, self.settings.max_points_per_prompt)
                for i, p in enumerate(request.prompts)
            ]
            results = await segmentation.segment(
                self.triton, model.meta, embedded_image(entry), prompts, self._timeout(context))
            return pb.SegmentResponse(
                image_id=image_id, width=original[1], height=original[0], cached=cached, model_id=model.meta.model_id,
                results=await results_to_proto(results, request.mask_encoding, request.return_low_res_logits),
            )
        finally:
            await model.cache.release(entry)

    @grpc_errors
    async def GenerateMasks(
        self, request: pb.GenerateMasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateMasksResponse:
        model = self._served()
        params = amg_params_from_proto(request)
        params.validate(self.settings.max_generate_points, self.settings.max_generate_points_per_batch)
        whole, cached, image_id, source = await self._request_image(model, request, context)
        original = whole.embedding.original_size
        encoded_any = not cached

        @contextlib.asynccontextmanager
        async def crop_embedding(crop: amg.CropBox) -> AsyncIterator[segmentation.EmbeddedImage]:
            nonlocal encoded_any
            if crop == (0, 0, original[1], original[0]):  # the whole image: already held for this request
                yield embedded_image(whole)
                return
            entry, hit = await self._embedding(model, image_id, source, context, crop)
            encoded_any |= not hit
            try:
                yield embedded_image(entry)
            finally:
                await model.cache.release(entry)

        async def decode(
            image: segmentation.EmbeddedImage, batch: processing.DecoderBatch
        ) -> tuple[np.ndarray, np.ndarray]:
            return await self.triton.decode(image.embedding, batch, self._timeout(context))

        generator = amg.MaskGenerator(params, model.meta, decode, crop_embedding,
                                      self.settings.generate_decoder_calls_in_flight)
        try:
            masks = await generator.generate(original)
        finally:
            await model.cache.release(whole)
        metrics.GENERATED_MASKS.observe(len(masks))
        metrics.GENERATE_POINTS.inc(generator.progress.points)
        records = await asyncio.get_running_loop().run_in_executor(
            segmentation.POSTPROCESS_POOL, generated_masks_to_proto, masks, original, request.mask_encoding
        )
        return pb.GenerateMasksResponse(
            image_id=image_id, width=original[1], height=original[0], cached=not encoded_any,
            model_id=model.meta.model_id, masks=records, crops=generator.progress.crops,
            points=generator.progress.points,
        )


class ImageSource:
    """A request's encoded image, decoded (EXIF applied, size-checked) at most once, and only when needed."""

    def __init__(self, data: bytes, max_pixels: int) -> None:
        self.data = data
        self.max_pixels = max_pixels
        self._pixels: np.ndarray | None = None
        self._lock = asyncio.Lock()

    async def pixels(self) -> np.ndarray:
        """uint8, H x W x 3 RGB."""
        async with self._lock:
            if self._pixels is None:
                self._pixels = await asyncio.to_thread(images.decode_image, self.data, self.max_pixels)
                metrics.IMAGE_PIXELS.observe(self._pixels.shape[0] * self._pixels.shape[1])
            return self._pixels


def embedded_image(entry: CacheEntry) -> segmentation.EmbeddedImage:
    """A cache entry as the decoder path takes it (staged embedding + sizes)."""
    return segmentation.EmbeddedImage(entry.staged, entry.embedding.original_size, entry.embedding.input_size)


def crop_id(image_id: str, crop: amg.CropBox) -> str:
    """Cache id of one crop's embedding (the whole image uses the image id itself, shared with Embed)."""
    return f"{image_id}:crop:{','.join(map(str, crop))}"


def amg_params_from_proto(request: pb.GenerateMasksRequest) -> amg.AmgParams:
    """The request's parameters; unset ones keep the official defaults (validated by AmgParams.validate)."""
    fields: dict[str, Any] = {name: getattr(request, name) for name in amg.SCALAR_PARAMETERS
                               if request.HasField(name)}
    if request.point_grids:
        grids = []
        for layer, grid in enumerate(request.point_grids):
            if len(grid.x) != len(grid.y):
                raise InvalidArgument(f"point_grids[{layer}] has {len(grid.x)} x and {len(grid.y)} y values")
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


def connect_redis(settings: Settings) -> Any | None:
    """A redis.asyncio client (or Cluster client) for tier 2, or None when no URL is configured."""
    if not settings.redis_url:
        LOG.warning("SAMSERVE_REDIS_URL is not set: embedding cache runs on tier 1 (in-process) alone")
        return None
    import redis.asyncio as redis_asyncio
    from redis.asyncio.cluster import RedisCluster

    options = dict(socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s)
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return redis_asyncio.Redis.from_url(settings.redis_url, **options)


async def create_server(
    settings: Settings, redis_factory: Callable[[Settings], Any | None] = connect_redis
) -> tuple[grpc.aio.Server, int, Gateway]:
    """Build and start the gateway: returns (server, bound port, servicer). Port 0 picks a free port."""
    triton = TritonSam(settings.triton_grpc_url, embedding_transport=settings.embedding_transport)
    gateway = Gateway(settings, triton, redis_factory(settings))
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", 1 << 30),
    ])
    pb_grpc.add_SegmentAnythingServicer_to_server(gateway, server)
    health_pb2_grpc.add_HealthServicer_to_server(gateway.health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{settings.gateway_host}:{settings.gateway_port}")
    metrics.serve_metrics(settings.metrics_port, settings.gateway_host)
    await server.start()
    await gateway.start()
    LOG.info("gateway listening on %s:%d", settings.gateway_host, port)
    return server, port, gateway


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the gateway until ``stop`` is set, then drain gracefully (health NOT_SERVING, in-flight calls finish)."""
    server, _, gateway = await create_server(settings)
    try:
        await stop.wait()
    finally:
        LOG.info("gateway draining (grace %.0f s)", settings.shutdown_grace_s)
        await gateway.health.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_s)
        await gateway.close()
