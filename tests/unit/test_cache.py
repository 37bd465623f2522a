"""The embedding cache's pieces on their own: record codec, tier-1 accounting, failure logging, encode limiter."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from samserve.cache import CorruptRecord, Embedding, EmbeddingCache, EmbeddingCodec, FailureLog, round_trip_fp16
from samserve.errors import ResourceExhausted
from samserve.gateway import EncodeLimiter
from samserve.triton_models import TritonSam


def embedding(seed: int = 0, shape=(8, 4, 4)) -> Embedding:
    array = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return Embedding(array=array, original_size=(480, 640), input_size=(768, 1024))


def test_codec_round_trip_is_fp16_exact():
    original = embedding()
    record = EmbeddingCodec.encode(original)
    assert len(record) == EmbeddingCodec.HEADER.size + 8 * 4 * 4 * 2 + EmbeddingCodec.TRAILER.size
    decoded = EmbeddingCodec.decode(record)
    assert decoded.original_size == (480, 640) and decoded.input_size == (768, 1024)
    np.testing.assert_array_equal(decoded.array.astype(np.float32), round_trip_fp16(original).array)


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


def test_tier_one_is_bounded_in_bytes_and_keeps_entries_in_use():
    async def scenario():
        triton = TritonSam("127.0.0.1:1", embedding_transport="grpc")  # grpc transport: staging needs no server
        one = embedding().array.nbytes
        cache = EmbeddingCache(triton, "ns", l1_bytes=2 * one)
        computed = []

        async def compute_for(i: int):
            computed.append(i)
            return embedding(i)

        first, cached = await cache.get_or_compute("a", lambda: compute_for(0))
        assert not cached
        await cache.get_or_compute("b", lambda: compute_for(1))
        await cache.release((await cache.get("b")))
        await cache.get_or_compute("c", lambda: compute_for(2))  # evicts "a" (least recently used)
        assert cache.l1_used_bytes <= 2 * one
        assert await cache.get("a") is None and first.evicted and first.users == 1
        await cache.release(first)
        assert first.users == 0
        again, cached = await cache.get_or_compute("a", lambda: compute_for(3))
        assert not cached and computed == [0, 1, 2, 3]
        await triton.close()

    asyncio.run(scenario())


def test_single_flight_within_a_process():
    async def scenario():
        triton = TritonSam("127.0.0.1:1", embedding_transport="grpc")
        cache = EmbeddingCache(triton, "ns", l1_bytes=1 << 20)
        calls = 0

        async def slow():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return embedding()

        results = await asyncio.gather(*(cache.get_or_compute("k", slow) for _ in range(10)))
        assert calls == 1
        assert [cached for _, cached in results].count(False) == 1
        assert cache.stats.single_flight_waits == 9
        await triton.close()

    asyncio.run(scenario())


def test_failure_log_counts_everything_but_logs_once_per_interval(caplog):
    log = FailureLog(interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="samserve.cache"):
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

