"""Tier 2 of the caches: Redis (single node or Cluster) operations under a timeout, whose failures are counted and
logged at most once per interval, never raised: with Redis unreachable, slow or returning a corrupt record, a request
still succeeds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter

from samserve.cache.codec import CorruptRecord

LOG = logging.getLogger(__name__)


class FailureLog:
    """Counts tier-2 failures; logs the first and then at most one summary per interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.count = 0
        self._unlogged = 0
        self._last_logged = float("-inf")

    def record(self, what: str, error: BaseException) -> None:
        self.count += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_logged >= self.interval_s:
            LOG.warning("redis %s failed (%s: %s); %d failure(s) since the last report, serving without tier 2",
                        what, type(error).__name__, error, self._unlogged)
            self._last_logged, self._unlogged = now, 0


T = TypeVar("T")


class RedisTier:
    """Tier-2 operations on a ``redis.asyncio`` client (or Cluster client, or None: no tier 2), shared by the
    embedding cache and the image store (:mod:`samserve.cache.image_store`): each call runs under ``timeout_s``, and any
    failure is counted in ``failures`` and logged, never raised; reads count ``lookups`` (tier "l2": hit, miss,
    error)."""

    def __init__(self, redis: Any | None, timeout_s: float, failures: FailureLog, lookups: Counter) -> None:
        self.redis: Any = redis
        self.timeout_s = timeout_s
        self.failures = failures
        self.lookups = lookups

    async def call(self, what: str, call: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """(ok, result) of one Redis operation under the timeout; failures are counted, never raised."""
        if self.redis is None:
            return False, None
        try:
            return True, await asyncio.wait_for(call(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any Redis trouble means "no tier 2 for this call"
            self.failures.record(what, error)
            return False, None

    async def read(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """The record at ``key`` decoded, or None (no Redis, missing, failed); a record that ``decode`` rejects
        with :class:`CorruptRecord` is counted as an error, logged and deleted."""
        if self.redis is None:
            return None
        ok, record = await self.call("GET", lambda: self.redis.get(key))
        if not ok:
            self.lookups.labels("l2", "error").inc()
            return None
        if record is None:
            self.lookups.labels("l2", "miss").inc()
            return None
        try:
            value = decode(record)
        except CorruptRecord as error:
            self.lookups.labels("l2", "error").inc()
            self.failures.record("record decode", error)
            await self.call("DEL", lambda: self.redis.delete(key))
            return None
        self.lookups.labels("l2", "hit").inc()
        return value

    async def write(self, key: str, record: bytes, ttl_s: int) -> bool:
        """SET ``key`` with a TTL; False when there is no Redis or the write failed (counted)."""
        ok, _ = await self.call("SET", lambda: self.redis.set(key, record, ex=ttl_s))
        return ok
