"""Tier 2 written back from tier 1 after Redis lost its keys, so that an ``image_id`` stays a full handle across a
Redis restart followed by a gateway restart.

Without this, a Redis that restarts empty (no persistence, a failover to an empty replica, FLUSHALL) forgets every
image while each gateway still serves the hot ones from tier 1, which never rewrites Redis on a hit. A gateway that
restarts next (a rolling update) then answers NOT_FOUND for those ids and clients must send the bytes again.

How the loss is noticed: each gateway keeps a marker key of its own (``samserve:alive:<random>``) in Redis and
refreshes it every ``redis_refill_check_s`` with one EXPIRE, which answers whether the key still existed. A marker
gone means Redis lost what this gateway wrote; the gateway then sets its marker again and writes back, in the
background, everything its tier 1 holds: the image bytes and the served model's embeddings, most recently used first,
each ``SET NX`` (a record another replica already wrote back is left alone). A Redis that is unreachable or slow
answers nothing about the marker and triggers nothing; a write that fails ends the pass (the next loss is noticed
again by the marker). With Redis Cluster the marker lives on one shard: the loss of another shard is not noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator

from samserve.cache.redis_tier import RedisTier
from samserve.core import metrics

LOG = logging.getLogger(__name__)

MARKER_PREFIX = "samserve:alive:"

Record = tuple[str, str, Callable[[], bytes]]
"""(kind, Redis key, the record's bytes on demand): one tier-1 entry to write back; kind is "image" or "embedding"."""


class Tier2Refill:
    """Checks this gateway's marker every ``interval_s`` and writes ``records()`` back to Redis when it is gone."""

    def __init__(self, tier: RedisTier, records: Callable[[], Iterable[Record]], interval_s: float,
                 ttl_s: int) -> None:
        self.tier = tier
        self.records = records
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.marker = MARKER_PREFIX + secrets.token_hex(8)
        self._marked = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run :meth:`check` every ``interval_s`` (not at all without Redis or with an interval of 0)."""
        if self.tier.redis is not None and self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="tier2-refill")

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def check(self) -> int:
        """One check of the marker; when Redis lost it, write tier 1 back. Returns the records written."""
        redis = self.tier.redis
        if self._marked:
            ok, existed = await self.tier.call("EXPIRE", lambda: redis.expire(self.marker, self.ttl_s))
            if not ok or existed:
                return 0
        ok, _ = await self.tier.call("SET", lambda: redis.set(self.marker, b"1", ex=self.ttl_s))
        if not ok:
            return 0
        lost, self._marked = self._marked, True
        return await self.write_back() if lost else 0

    async def write_back(self) -> int:
        """Write every record of tier 1 that Redis lacks (``SET NX``); stop at the first failed write."""
        written: dict[str, int] = {}
        redis = self.tier.redis
        for kind, key, record in _snapshot(self.records()):
            ok, created = await self.tier.call("SET", functools.partial(redis.set, key, record(), ex=self.ttl_s,
                                                                        nx=True))
            if not ok:
                break
            if created:
                written[kind] = written.get(kind, 0) + 1
                metrics.TIER2_REFILLED.labels(kind).inc()
        LOG.warning("Redis lost its keys (this gateway's marker was gone): wrote back %s from tier 1",
                    ", ".join(f"{count} {kind}(s)" for kind, count in sorted(written.items())) or "nothing")
        return sum(written.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def constant(record: bytes) -> Callable[[], bytes]:
    """A record that is already bytes, as :data:`Record` takes it."""
    return lambda: record


def _snapshot(records: Iterable[Record]) -> Iterator[Record]:
    """The records as they are now: tier 1 may change while the writes await."""
    yield from list(records)
