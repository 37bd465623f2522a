"""Two-tier embedding cache with single flight: encode each image once, across requests and replicas.

* Key: ``<model id>:<weights sha256>:pp<preprocessing version>:<image sha256>`` (ModelMetadata.cache_namespace):
  an embedding made by other weights or other preprocessing is never served.
* Tier 1, in process: an LRU bounded in bytes whose entries are already staged for the decoder (in Triton
  shared memory when that transport is used), so a hot prompt costs no copy of the embedding at all.
* Tier 2, Redis (single node or Cluster): the embedding in fp16 in a compact binary record (see
  :class:`samserve.cache.codec.EmbeddingCodec`), with a TTL.
* Single flight: concurrent misses for one key wait for one encoder run — an in-process future within a
  replica and a short-lived Redis lock across replicas (``SET NX PX``; a crashed holder's lock expires).
* Redis unreachable, slow or returning a corrupt record: the request still succeeds (the embedding is
  recomputed); the failure is counted and logged at most once per interval, never raised to the client.

Every embedding is served from its fp16 form, whether it was just computed or read from Redis, so all
replicas answer identically.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

from samserve.cache.codec import EmbeddingCodec
from samserve.cache.redis_tier import FailureLog, RedisTier
from samserve.cache.refill import Record
from samserve.core import metrics
from samserve.core.embedding import EmbeddedImage, Embedding

LOG = logging.getLogger(__name__)


class Stager(Protocol):
    """Makes an embedding ready for decoder calls and frees it again (the Triton client, or a fake in unit tests)."""

    async def stage(self, embedding: Embedding) -> EmbeddedImage: ...

    async def release(self, image: EmbeddedImage) -> None: ...


Compute = Callable[[], Awaitable[Embedding]]
"""Computes a missing embedding (float32, from the encoder)."""


class Missing(LookupError):
    """The id is in neither tier."""


class _HolderCancelled(Exception):
    """The request computing an embedding was cancelled; its single-flight waiters retry."""


class _Entry:
    """A tier-1 entry: the staged embedding plus a count of requests using it (released when unused)."""

    def __init__(self, image: EmbeddedImage) -> None:
        self.image = image
        self.users = 0
        self.evicted = False


class EmbeddingCache:
    """Tier 1 + tier 2 + single flight. ``redis`` is a ``redis.asyncio`` client (or Cluster client) or None."""

    LOCK_POLL_S = 0.05

    def __init__(
        self,
        stager: Stager,
        namespace: str,
        l1_bytes: int,
        redis: Any | None = None,
        ttl_s: int = 86400,
        redis_timeout_s: float = 1.0,
        lock_ttl_s: float = 120.0,
        failure_log_interval_s: float = 30.0,
    ) -> None:
        self.stager = stager
        self.namespace = namespace
        self.l1_bytes = l1_bytes
        self.redis: Any = redis  # redis.asyncio client or None; every use goes through _redis, which checks
        self.ttl_s = ttl_s
        self.redis_timeout_s = redis_timeout_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.failures = FailureLog(failure_log_interval_s)
        self.tier2 = RedisTier(redis, redis_timeout_s, self.failures, metrics.CACHE_LOOKUPS)
        self._l1: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._l1_used = 0
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}

    # -- keys ---------------------------------------------------------------------------------------------
    def key(self, image_id: str) -> str:
        return f"samserve:emb:{self.namespace}:{image_id}"

    @property
    def l1_used_bytes(self) -> int:
        return self._l1_used

    # -- tier 1 -------------------------------------------------------------------------------------------
    def _l1_get(self, key: str, count: bool = True) -> _Entry | None:
        entry = self._l1.get(key)
        if entry is not None:
            self._l1.move_to_end(key)
        if count:
            metrics.CACHE_LOOKUPS.labels("l1", "hit" if entry is not None else "miss").inc()
        return entry

    async def _l1_put(self, key: str, embedding: Embedding) -> _Entry:
        entry = _Entry(await self.stager.stage(embedding))
        if entry.image.nbytes > self.l1_bytes:  # too big to keep: serve it once, release after use
            entry.evicted = True
            return entry
        self._l1[key] = entry
        self._l1_used += entry.image.nbytes
        while self._l1_used > self.l1_bytes:
            _, old = self._l1.popitem(last=False)
            self._l1_used -= old.image.nbytes
            old.evicted = True
            if old.users == 0:
                await self.stager.release(old.image)
        metrics.CACHE_L1_BYTES.set(self._l1_used)
        return entry

    async def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            await self.stager.release(entry.image)

    # -- tier 2 -------------------------------------------------------------------------------------------
    async def _redis(self, what: str, call: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """(ok, result) of one Redis operation under the timeout; failures are counted, never raised."""
        return await self.tier2.call(what, call)

    async def _l2_get(self, key: str) -> Embedding | None:
        return await self.tier2.read(key, EmbeddingCodec.decode)

    async def _l2_put(self, key: str, embedding: Embedding) -> None:
        await self.tier2.write(key, EmbeddingCodec.encode(embedding), self.ttl_s)

    # -- lookups ------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(
        self, image_id: str, compute: Compute | None = None
    ) -> AsyncIterator[tuple[EmbeddedImage, bool]]:
        """(embedded image, cached) held for the block: from tier 1, tier 2, or ``compute`` (once across concurrent
        callers and replicas). ``cached`` is False only for the caller whose ``compute`` ran. Without ``compute`` a
        miss raises :class:`Missing`."""
        if compute is None:
            entry, cached = await self._get(image_id), True
        else:
            entry, cached = await self._get_or_compute(image_id, compute)
        try:
            yield entry.image, cached
        finally:
            await self._release(entry)

    async def _get(self, image_id: str) -> _Entry:
        key = self.key(image_id)
        entry = self._l1_get(key)
        if entry is None:
            embedding = await self._l2_get(key)
            if embedding is None:
                raise Missing(image_id)
            entry = self._l1_get(key, count=False) or await self._l1_put(key, embedding)
        entry.users += 1
        return entry

    async def _get_or_compute(self, image_id: str, compute: Compute) -> tuple[_Entry, bool]:
        key = self.key(image_id)
        entry = self._l1_get(key)
        if entry is not None:
            entry.users += 1
            return entry, True
        pending = self._inflight.get(key)
        if pending is not None:
            metrics.SINGLE_FLIGHT_WAITS.inc()
            try:
                entry = await asyncio.shield(pending)
            except (_HolderCancelled, Missing):
                # The request that was encoding went away, or had no image bytes to encode from (it named the
                # image by id): this caller may have them, so it tries itself.
                return await self._get_or_compute(image_id, compute)
            entry.users += 1
            return entry, True
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry, cached = await self._fill(key, compute)
        except BaseException as error:
            future.set_exception(error if isinstance(error, Exception) else _HolderCancelled())
            future.exception()  # retrieved: waiters re-raise it, nobody warns about it
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(entry)
        entry.users += 1
        return entry, cached

    async def _fill(self, key: str, compute: Compute) -> tuple[_Entry, bool]:
        """Tier 2, else compute under the cross-replica lock (or without it when Redis fails)."""
        embedding = await self._l2_get(key)
        if embedding is not None:
            return await self._l1_put(key, embedding), True
        lock_key, token = key + ":lock", secrets.token_hex(8)
        while True:
            ok, acquired = await self._redis(
                "lock", lambda: self.redis.set(lock_key, token, nx=True, px=self.lock_ttl_ms)
            )
            if not ok or acquired:
                break
            # Another replica is encoding: take its result, or the lock once it is gone (holder crashed).
            metrics.SINGLE_FLIGHT_WAITS.inc()
            while True:
                await asyncio.sleep(self.LOCK_POLL_S)
                embedding = await self._l2_get(key)
                if embedding is not None:
                    return await self._l1_put(key, embedding), True
                ok, held = await self._redis("lock check", lambda: self.redis.exists(lock_key))
                if not ok or not held:
                    break
            if not ok:
                break
        try:
            embedding = (await compute()).round_trip_fp16()
            await self._l2_put(key, embedding)
        finally:
            if ok and acquired:
                await self._redis("unlock", lambda: self._unlock(lock_key, token))
        return await self._l1_put(key, embedding), False

    UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    async def _unlock(self, lock_key: str, token: str) -> Any:
        return await self.redis.eval(self.UNLOCK_SCRIPT, 1, lock_key, token)

    def records(self) -> Iterator[Record]:
        """Tier 1 as tier-2 records (fp16, as :meth:`_l2_put` writes them), most recently used first
        (:mod:`samserve.cache.refill` writes them back)."""
        for key, entry in reversed(self._l1.items()):
            yield "embedding", key, functools.partial(EmbeddingCodec.encode, entry.image.embedding)

    async def close(self) -> None:
        """Drop tier 1; entries still in use are released when their last lease ends."""
        entries = list(self._l1.values())
        self._l1.clear()
        self._l1_used = 0
        metrics.CACHE_L1_BYTES.set(0)
        for entry in entries:
            entry.evicted = True
            if entry.users == 0:
                await self.stager.release(entry.image)
