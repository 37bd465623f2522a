"""The embedding cache's pieces on their own (a fake stager, no Triton): record codec, tier-1 accounting, the fp16
round trip, single flight, failure logging, encode limiter."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from samserve.cache.codec import CorruptRecord, EmbeddingCodec
from samserve.cache.embedder import EncodeLimiter
from samserve.cache.embedding_cache import EmbeddingCache, Missing
from samserve.cache.redis_tier import FailureLog
from samserve.core import metrics
from samserve.core.embedding import EmbeddedImage, Embedding, Staged
from samserve.core.errors import ResourceExhausted


def embedding(seed: int = 0, shape=(8, 4, 4)) -> Embedding:
    array = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return Embedding(array=array, original_size=(480, 640), input_size=(768, 1024))


def test_codec_round_trip_is_fp16_exact():
    original = embedding()
    record = EmbeddingCodec.encode(original)
    assert len(record) == EmbeddingCodec.HEADER.size + 8 * 4 * 4 * 2 + EmbeddingCodec.TRAILER.size
    decoded = EmbeddingCodec.decode(record)
    assert decoded.original_size == (480, 640) and decoded.input_size == (768, 1024)
    np.testing.assert_array_equal(decoded.array.astype(np.float32), original.round_trip_fp16().array)


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "empty"])
def test_codec_rejects_damaged_records(damage):
    record = bytearray(EmbeddingCodec.encode(embedding()))
    if damage == "flip":
        record[40] ^= 0xFF
    elif damage == "truncate":
        record = record[:-10]
    elif damage == "version":
        record[4] = 99
    else:
        record = bytearray()
    with pytest.raises(CorruptRecord):
        EmbeddingCodec.decode(bytes(record))


class FakeStager:
    """Stages by keeping the array (as the gRPC transport does); records what is staged now."""

    def __init__(self) -> None:
        self.staged: set[int] = set()

    async def stage(self, value: Embedding) -> EmbeddedImage:
        image = EmbeddedImage(value, Staged())
        self.staged.add(id(image))
        return image

    async def release(self, image: EmbeddedImage) -> None:
        self.staged.remove(id(image))


def test_tier_one_is_bounded_in_bytes_and_keeps_entries_in_use():
    async def scenario():
        stager = FakeStager()
        one = embedding().array.nbytes
        cache = EmbeddingCache(stager, "ns", l1_bytes=2 * one)
        computed = []

        async def compute_for(i: int):
            computed.append(i)
            return embedding(i)

        async with cache.lease("a", lambda: compute_for(0)) as (first, cached):
            assert not cached
            async with cache.lease("b", lambda: compute_for(1)):
                pass
            async with cache.lease("b") as (_, cached):  # a lookup by id alone
                assert cached
            async with cache.lease("c", lambda: compute_for(2)):  # evicts "a" (least recently used)
                pass
            assert cache.l1_used_bytes <= 2 * one
            with pytest.raises(Missing):
                async with cache.lease("a"):
                    pass
            assert id(first) in stager.staged  # evicted while in use: still staged
        assert id(first) not in stager.staged  # released with its last lease
        async with cache.lease("a", lambda: compute_for(3)) as (_, cached):
            assert not cached and computed == [0, 1, 2, 3]
        await cache.close()
        assert not stager.staged

    asyncio.run(scenario())


def test_every_served_embedding_is_the_fp16_round_trip():
    async def scenario():
        cache = EmbeddingCache(FakeStager(), "ns", l1_bytes=1 << 20)
        original = embedding(7)
        async with cache.lease("k", lambda: asyncio.sleep(0, original)) as (image, _):
            np.testing.assert_array_equal(image.embedding.array, original.round_trip_fp16().array)
            assert not np.array_equal(image.embedding.array, original.array)

    asyncio.run(scenario())


def test_single_flight_within_a_process():
    async def scenario():
        cache = EmbeddingCache(FakeStager(), "ns", l1_bytes=1 << 20)
        waits_before = metrics.SINGLE_FLIGHT_WAITS._value.get()
        release = asyncio.Event()
        calls = 0

        async def held_until_released():
            nonlocal calls
            calls += 1
            await release.wait()
            return embedding()

        async def one():
            async with cache.lease("k", held_until_released) as (_, cached):
                return cached

        tasks = [asyncio.create_task(one()) for _ in range(10)]
        for _ in range(1000):  # bounded: every other caller must be waiting on the first one's encode
            if metrics.SINGLE_FLIGHT_WAITS._value.get() - waits_before == 9:
                break
            await asyncio.sleep(0)
        assert metrics.SINGLE_FLIGHT_WAITS._value.get() - waits_before == 9
        assert calls == 1 and not any(task.done() for task in tasks)  # they waited
        release.set()
        results = await asyncio.gather(*tasks)
        assert calls == 1 and results.count(False) == 1

    asyncio.run(scenario())


def test_a_waiter_with_the_bytes_encodes_when_the_holder_had_only_the_id():
    """Single flight across a request by image_id (no bytes: its compute finds none) and one that sent the bytes:
    the second must not inherit the first one's NOT_FOUND (found by the chaos soak after a rolling restart)."""
    async def scenario():
        cache = EmbeddingCache(FakeStager(), "ns", l1_bytes=1 << 20)
        waits_before = metrics.SINGLE_FLIGHT_WAITS._value.get()
        release = asyncio.Event()

        async def no_bytes():
            await release.wait()
            raise Missing("k")

        async def lease(compute):
            async with cache.lease("k", compute) as (_, cached):
                return cached

        by_id = asyncio.create_task(lease(no_bytes))
        with_bytes = asyncio.create_task(lease(lambda: asyncio.sleep(0, embedding())))
        for _ in range(1000):  # bounded: the second waits on the first one's compute
            if metrics.SINGLE_FLIGHT_WAITS._value.get() > waits_before:
                break
            await asyncio.sleep(0)
        assert metrics.SINGLE_FLIGHT_WAITS._value.get() == waits_before + 1
        release.set()
        with pytest.raises(Missing):
            await by_id
        assert await with_bytes is False  # it encoded, from its own bytes

    asyncio.run(scenario())


def test_failure_log_counts_everything_but_logs_once_per_interval(caplog):
    log = FailureLog(interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="samserve.cache.redis_tier"):
        for _ in range(5):
            log.record("GET", ConnectionError("down"))
    assert log.count == 5
    assert len([r for r in caplog.records if "redis GET failed" in r.message]) == 1


def test_encode_limiter_rejects_beyond_the_queue():
    async def scenario():
        limiter = EncodeLimiter(concurrent=1, queued=1)
        release = asyncio.Event()

        async def hold():
            async with limiter.slot():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second = asyncio.create_task(hold())  # queued
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted):
            async with limiter.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        async with limiter.slot():  # free again
            pass

    asyncio.run(scenario())

