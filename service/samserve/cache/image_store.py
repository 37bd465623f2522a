"""The encoded image bytes behind each ``image_id``, kept next to its embedding: an id alone is a full handle.

Crops (GenerateMasks with ``crop_n_layers > 0``) and an evicted or expired embedding need pixels; with the bytes
kept here, the embedder (:mod:`samserve.cache.embedder`) computes them from an ``image_id`` alone, and NOT_FOUND means
that neither the embedding nor the bytes are known.

* Key: the image's scoped cache id (:meth:`samserve.cache.embedder.ImageRef.cache_id`), so the cache scope partitions
the
  bytes exactly as it partitions the embeddings; no model in the key (the bytes serve every model).
* Tier 1, in process: an LRU bounded in bytes (``l1_image_bytes``; 0 keeps none in process).
* Tier 2, Redis: the same client and TTL as the embeddings, under ``samserve:img:``; every operation goes through
  :class:`samserve.cache.redis_tier.RedisTier`, so a Redis failure is counted and logged, never raised.
* Bounded: images over ``max_bytes`` (the request size limit) are never kept.
* Written when the image's embedding is computed (so bytes and embedding share their TTL) and when a request sends
  bytes that tier 1 lacks (once per replica, not on every hit of a hot image); a record read back from Redis is
  checked against its content address (its id is the SHA-256 of the bytes).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from samserve.cache.codec import CorruptRecord
from samserve.cache.redis_tier import FailureLog, RedisTier
from samserve.cache.refill import Record, constant
from samserve.core import metrics
from samserve.vision import images

KEY_PREFIX = "samserve:img:"
"""Redis keys of image bytes; the embeddings' are ``samserve:emb:``."""


class ImageStore:
    """Encoded image bytes by scoped cache id: tier 1 in process, tier 2 Redis. One per gateway (all models)."""

    def __init__(
        self,
        l1_bytes: int,
        max_bytes: int,
        redis: Any | None = None,
        ttl_s: int = 86400,
        redis_timeout_s: float = 1.0,
        failure_log_interval_s: float = 30.0,
    ) -> None:
        self.l1_bytes = l1_bytes
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.failures = FailureLog(failure_log_interval_s)
        self.tier2 = RedisTier(redis, redis_timeout_s, self.failures, metrics.IMAGE_STORE_LOOKUPS)
        self._l1: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._l1_used = 0

    @staticmethod
    def key(cache_id: str) -> str:
        """The Redis key of an image's bytes."""
        return KEY_PREFIX + cache_id

    @property
    def l1_used_bytes(self) -> int:
        return self._l1_used

    # -- tier 1 -------------------------------------------------------------------------------------------
    def _l1_fits(self, data: bytes) -> bool:
        return len(data) <= self.l1_bytes

    def _l1_get(self, cache_id: str) -> bytes | None:
        data = self._l1.get(cache_id)
        if data is not None:
            self._l1.move_to_end(cache_id)
        return data

    def _l1_put(self, cache_id: str, data: bytes) -> None:
        """Keep ``data`` as the most recently used entry, evicting the least recently used beyond ``l1_bytes``."""
        if not self._l1_fits(data):
            return
        previous = self._l1.pop(cache_id, None)
        if previous is not None:
            self._l1_used -= len(previous)
        self._l1[cache_id] = data
        self._l1_used += len(data)
        while self._l1_used > self.l1_bytes:
            _, old = self._l1.popitem(last=False)
            self._l1_used -= len(old)
        metrics.IMAGE_STORE_L1_BYTES.set(self._l1_used)

    # -- the store ----------------------------------------------------------------------------------------
    async def put(self, cache_id: str, data: bytes) -> None:
        """Keep ``data`` in both tiers (tier 2 with the TTL from now); images over ``max_bytes`` are not kept."""
        if len(data) > self.max_bytes:
            return
        self._l1_put(cache_id, data)
        await self.tier2.write(self.key(cache_id), data, self.ttl_s)

    async def remember(self, cache_id: str, data: bytes, fresh: bool) -> None:
        """A request holds ``data``: keep it when its embedding was just computed (``fresh``: bytes and embedding
        then share their TTL) or when tier 1 lacks it; a tier-1 hit only marks it recently used, so a hot image
        does not rewrite Redis on every request."""
        if not fresh and (not self._l1_fits(data) or self._l1_get(cache_id) is not None):
            return
        await self.put(cache_id, data)

    async def get(self, cache_id: str, image_id: str) -> bytes | None:
        """The bytes kept for ``cache_id`` (whose content address is ``image_id``), from tier 1, else tier 2 (then
        kept in tier 1); None when neither has them. Each lookup is counted per tier."""
        data = self._l1_get(cache_id)
        metrics.IMAGE_STORE_LOOKUPS.labels("l1", "hit" if data is not None else "miss").inc()
        if data is not None:
            return data

        def checked(record: bytes) -> bytes:
            if images.image_id(record) != image_id:
                raise CorruptRecord(f"image bytes of {len(record)} bytes do not hash to their id")
            return bytes(record)

        data = await self.tier2.read(self.key(cache_id), checked)
        if data is not None:
            self._l1_put(cache_id, data)
        return data

    def records(self) -> Iterator[Record]:
        """Tier 1 as tier-2 records, most recently used first (:mod:`samserve.cache.refill` writes them back)."""
        for cache_id, data in reversed(self._l1.items()):
            yield "image", self.key(cache_id), constant(data)

    def close(self) -> None:
        """Drop tier 1."""
        self._l1.clear()
        self._l1_used = 0
        metrics.IMAGE_STORE_L1_BYTES.set(0)
