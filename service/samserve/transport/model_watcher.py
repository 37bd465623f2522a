"""Keeps the gateway in step with Triton: health (SERVING only while both SAM models are ready) and the served
model (metadata, its embedding cache and embedder), renewed whenever the model changes or Triton comes back; the
image store (the bytes behind the ids) lives as long as the gateway and serves every model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from grpc_health.v1 import health, health_pb2

from samserve import __version__
from samserve.cache.embedder import DecodeBudget, EncodeLimiter, ImageEmbedder
from samserve.cache.embedding_cache import EmbeddingCache
from samserve.cache.image_store import ImageStore
from samserve.cache.refill import Record, Tier2Refill
from samserve.core import metrics, model_spec
from samserve.core.api import SERVICE_NAME
from samserve.core.errors import Unavailable
from samserve.core.settings import GatewaySettings
from samserve.triton.models import TritonSam

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The model Triton serves now and the path to its embeddings."""

    meta: model_spec.ModelMetadata
    embedder: ImageEmbedder


class ModelWatcher:
    """Polls Triton every ``health_check_interval_s``; :meth:`current` is the served model or UNAVAILABLE."""

    def __init__(self, settings: GatewaySettings, triton: TritonSam, redis: Any | None) -> None:
        self.settings = settings
        self.triton = triton
        self.redis = redis
        self.health = health.aio.HealthServicer()
        self.limiter = EncodeLimiter(settings.max_concurrent_encodes, settings.max_queued_encodes)
        self.decode_budget = DecodeBudget(settings.max_decoding_pixels)
        self.images = ImageStore(
            settings.l1_image_bytes, settings.max_request_bytes, redis, ttl_s=settings.redis_ttl_s,
            redis_timeout_s=settings.redis_timeout_s, failure_log_interval_s=settings.failure_log_interval_s,
        )
        self.refill = Tier2Refill(self.images.tier2, self._tier1_records, settings.redis_refill_check_s,
                                  settings.redis_ttl_s)
        self._model: ServedModel | None = None
        self._ready = False
        self._task: asyncio.Task[None] | None = None

    def current(self) -> ServedModel:
        if self._model is None or not self._ready:
            raise Unavailable("Triton's SAM models are not ready")
        return self._model

    def _tier1_records(self) -> Iterator[Record]:
        """What tier 1 holds (image bytes, then the served model's embeddings), for the write-back to Redis."""
        yield from self.images.records()
        if self._model is not None:
            yield from self._model.embedder.cache.records()

    async def start(self) -> None:
        await self._set_health(False)
        self._task = asyncio.create_task(self._watch(), name="watch-triton")
        self.refill.start()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch(self) -> None:
        was_ready: bool | None = None
        told = ""  # what the log last said of why not: said once per change, not at every poll
        while True:
            ready = await self.triton.models_ready()
            why = ""
            if not ready:  # Triton's own reason: a plan for another GPU or TensorRT, a failed load, ...
                reasons = await self.triton.unready_reasons()
                if reasons:
                    why = "Triton cannot serve the SAM models: " + "; ".join(
                        f"{model} {reason}" for model, reason in sorted(reasons.items()))
            else:
                try:
                    meta = await self.triton.metadata()
                    # A new model, or Triton back after an outage: it forgot the shared-memory regions that
                    # tier 1 staged, so tier 1 starts afresh (tier 2 still has the embeddings).
                    if self._model is None or self._model.meta != meta or was_ready is False:
                        await self._use(meta)
                except Exception as error:  # noqa: BLE001 - metadata unreadable or unservable means not ready
                    why = f"cannot serve the model Triton serves: {error}"
                    ready = False
            if why and why != told:
                LOG.warning("%s", why)
            told = why
            if ready != was_ready:
                LOG.info("Triton models %s", "ready: SERVING" if ready else "not ready: NOT_SERVING")
                await self._set_health(ready)
                was_ready = ready
            self._ready = ready
            await asyncio.sleep(self.settings.health_check_interval_s)

    async def _use(self, meta: model_spec.ModelMetadata) -> None:
        if self._model is not None:
            await self._model.embedder.cache.close()
        await self.triton.forget_regions()
        settings = self.settings
        cache = EmbeddingCache(
            self.triton, meta.cache_namespace, settings.l1_cache_bytes, self.redis,
            ttl_s=settings.redis_ttl_s, redis_timeout_s=settings.redis_timeout_s,
            lock_ttl_s=settings.redis_lock_ttl_s, failure_log_interval_s=settings.failure_log_interval_s,
        )
        self._model = ServedModel(meta, ImageEmbedder(self.triton, meta.image_size, cache, self.limiter,
                                                      self.decode_budget, self.images))
        metrics.set_build_info(__version__, meta.model_id, meta.weights_sha256)
        engines = ", ".join(f"{e.plan} ({e.gpu_name}, compute capability {e.compute_capability}, TensorRT "
                            f"{e.tensorrt_version})" for e in self.triton.served.engines)
        LOG.info("serving %s (weights %s..., %d px, embedding %s, %s%s)", meta.model_id, meta.weights_sha256[:12],
                 meta.image_size, "x".join(map(str, meta.embedding_shape)), meta.precision,
                 f", TensorRT plans {engines}" if engines else "")

    async def close(self) -> None:
        """Stop watching and drop tier 1 (embeddings and image bytes)."""
        await self.refill.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._model is not None:
            await self._model.embedder.cache.close()
        self.images.close()
