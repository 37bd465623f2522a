"""The image store on its own (a dict-backed fake Redis, no servers): tier-1 LRU by bytes, the bounds, the disabled
tier, when Redis is written, Redis failures counted and never raised, records checked against their id; and the
embedder taking an id alone through it (a fake encoder), and refusing a too-thin image from its header."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from samserve.cache.embedder import DecodeBudget, EncodeLimiter, ImageEmbedder, ImageRef
from samserve.cache.embedding_cache import EmbeddingCache
from samserve.cache.image_store import KEY_PREFIX, ImageStore
from samserve.core import metrics
from samserve.core.embedding import Embedding
from samserve.core.errors import InvalidArgument, NotFound
from samserve.vision import images
from samserve.vision.processing import PreparedImage
from samserve_dev.images import png_bytes, synthetic_image
from tests.unit.test_cache import FakeStager


class FakeRedis:
    """The three ``redis.asyncio`` calls the store makes, on a dict; counts the writes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.sets = 0

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ex: int | None = None) -> bool:
        self.sets += 1
        self.data[key], self.ttls[key] = value, ex or 0
        return True

    async def delete(self, key: str) -> int:
        return int(self.data.pop(key, None) is not None)


class BrokenRedis:
    """Every call fails the way a Redis that went away does."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: object, **kwargs: object) -> None:
            raise ConnectionError("Connection refused")

        return fail


def blob(seed: int, size: int) -> tuple[str, bytes]:
    """(content id, ``size`` bytes): the store's records are content-addressed."""
    data = np.random.default_rng(seed).bytes(size)
    return images.image_id(data), data


def lookups(tier: str, result: str) -> float:
    return metrics.IMAGE_STORE_LOOKUPS.labels(tier, result)._value.get()


def test_tier_one_is_an_lru_bounded_in_bytes():
    async def scenario():
        store = ImageStore(l1_bytes=10, max_bytes=100)  # no Redis: tier 1 alone
        (a, da), (b, db), (c, dc) = blob(1, 4), blob(2, 4), blob(3, 4)
        await store.put(a, da)
        await store.put(b, db)
        assert await store.get(a, a) == da  # a is now the most recently used
        await store.put(c, dc)  # 12 bytes > 10: evicts b, the least recently used
        assert store.l1_used_bytes == 8
        assert await store.get(b, b) is None
        assert await store.get(a, a) == da and await store.get(c, c) == dc
        await store.put(a, da)  # the same entry again is not counted twice
        assert store.l1_used_bytes == 8
        (big, dbig) = blob(4, 11)  # larger than tier 1: not kept there (it would evict everything for nothing)
        await store.put(big, dbig)
        assert store.l1_used_bytes == 8 and await store.get(big, big) is None
        store.close()
        assert store.l1_used_bytes == 0 and await store.get(a, a) is None

    asyncio.run(scenario())


def test_tier_two_keeps_what_tier_one_drops_with_the_ttl_and_never_over_max_bytes():
    async def scenario():
        redis = FakeRedis()
        store = ImageStore(l1_bytes=0, max_bytes=50, redis=redis, ttl_s=1234)  # tier 1 disabled
        key, data = blob(5, 40)
        await store.put("tenant=a/" + key, data)
        assert store.l1_used_bytes == 0
        redis_key = KEY_PREFIX + "tenant=a/" + key
        assert redis.data == {redis_key: data} and redis.ttls[redis_key] == 1234
        l1_miss, l2_hit, l2_miss = lookups("l1", "miss"), lookups("l2", "hit"), lookups("l2", "miss")
        assert await store.get("tenant=a/" + key, key) == data
        assert await store.get("tenant=b/" + key, key) is None  # another scope is another key
        assert lookups("l1", "miss") == l1_miss + 2
        assert (lookups("l2", "hit"), lookups("l2", "miss")) == (l2_hit + 1, l2_miss + 1)
        big_key, big = blob(6, 51)  # over the request size limit: kept nowhere
        await store.put(big_key, big)
        assert len(redis.data) == 1

    asyncio.run(scenario())


def test_remember_writes_redis_once_per_tier_one_miss_or_fresh_embedding():
    async def scenario():
        redis = FakeRedis()
        store = ImageStore(l1_bytes=100, max_bytes=100, redis=redis)
        key, data = blob(7, 10)
        await store.remember(key, data, fresh=True)
        await store.remember(key, data, fresh=False)  # a hot image: tier 1 has it, Redis is not written again
        await store.remember(key, data, fresh=False)
        assert redis.sets == 1
        await store.remember(key, data, fresh=True)  # a new embedding: its bytes get the same TTL
        assert redis.sets == 2
        store.close()
        await store.remember(key, data, fresh=False)  # tier 1 lost it (another replica, a restart)
        assert redis.sets == 3
        without_l1 = ImageStore(l1_bytes=0, max_bytes=100, redis=redis)
        await without_l1.remember(key, data, fresh=False)  # without tier 1: only when the embedding is new
        assert redis.sets == 3
        await without_l1.remember(key, data, fresh=True)
        assert redis.sets == 4

    asyncio.run(scenario())


def test_redis_failures_are_counted_not_raised():
    async def scenario():
        store = ImageStore(l1_bytes=0, max_bytes=100, redis=BrokenRedis())
        key, data = blob(8, 10)
        errors = lookups("l2", "error")
        await store.put(key, data)
        await store.remember(key, data, fresh=True)
        assert await store.get(key, key) is None
        assert store.failures.count == 3  # two SETs and a GET
        assert lookups("l2", "error") == errors + 1  # the lookup

    asyncio.run(scenario())


def test_a_record_that_does_not_hash_to_its_id_is_an_error_and_deleted():
    async def scenario():
        redis = FakeRedis()
        store = ImageStore(l1_bytes=100, max_bytes=100, redis=redis)
        key, _ = blob(9, 10)
        redis.data[KEY_PREFIX + key] = b"not those bytes"
        errors = lookups("l2", "error")
        assert await store.get(key, key) is None
        assert lookups("l2", "error") == errors + 1 and store.failures.count == 1
        assert KEY_PREFIX + key not in redis.data and store.l1_used_bytes == 0

    asyncio.run(scenario())


class FakeEncoder:
    """The encoder's interface: an embedding made from the prepared pixels (so different crops differ)."""

    def __init__(self) -> None:
        self.calls = 0

    async def encode(self, image: PreparedImage, timeout_s: float | None = None) -> Embedding:
        self.calls += 1
        array = np.full((4, 2, 2), float(image.padded.mean()), dtype=np.float32)
        return Embedding(array, image.original_size, image.input_size)


def embedder(store: ImageStore) -> tuple[ImageEmbedder, FakeEncoder]:
    encoder = FakeEncoder()
    cache = EmbeddingCache(FakeStager(), "ns", l1_bytes=1 << 20)
    return ImageEmbedder(encoder, 32, cache, EncodeLimiter(1, 8), DecodeBudget(10**6), store), encoder


def test_an_id_alone_computes_missing_embeddings_from_the_kept_bytes():
    async def scenario():
        store = ImageStore(l1_bytes=1 << 20, max_bytes=1 << 20, redis=FakeRedis())
        first, encoder = embedder(store)
        data = png_bytes(synthetic_image(40, 60, seed=3))
        sent = ImageRef.from_bytes(data, max_pixels=10**6, scope="tenant=a")
        async with first.embedded(sent) as (whole, cached):
            assert not cached and whole.original_size == (40, 60)
        assert encoder.calls == 1
        # Another replica (empty caches, the same Redis): the whole image and a crop, by id alone.
        store.close()
        second, encoder = embedder(store)
        by_id = ImageRef(sent.image_id, max_pixels=10**6, scope="tenant=a")
        async with second.embedded(by_id) as (again, cached):
            assert not cached
            np.testing.assert_array_equal(again.embedding.array, whole.embedding.array)
        async with second.embedded(by_id, (0, 0, 30, 20)) as (crop, cached):
            assert not cached and crop.original_size == (20, 30)
        assert encoder.calls == 2
        with pytest.raises(NotFound, match="send the image bytes again"):  # another tenant's scope
            async with second.embedded(ImageRef(sent.image_id, max_pixels=10**6, scope="tenant=b")):
                pass
        with pytest.raises(NotFound, match="unknown or expired"):
            async with second.embedded(ImageRef("0" * 64, max_pixels=10**6)):
                pass
        assert encoder.calls == 2

    asyncio.run(scenario())


def test_an_image_too_thin_for_the_model_is_refused_from_its_header_before_decoding(monkeypatch):
    decoded = []

    def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
        decoded.append(len(data))
        return real_decode(data, max_pixels)

    real_decode = images.decode_image
    monkeypatch.setattr(images, "decode_image", decode_image)

    async def scenario():
        thin, encoder = embedder(ImageStore(l1_bytes=1 << 20, max_bytes=1 << 20))
        # 2000 x 1 at the 32-pixel input: its short side would be 32 / 2000 px, 0 once rounded.
        with pytest.raises(InvalidArgument, match=r"a 2000x1 image is too thin for the model"):
            async with thin.embedded(ImageRef.from_bytes(png_bytes(synthetic_image(1, 2000, seed=0)), 10**6)):
                pass
        assert decoded == [] and encoder.calls == 0
        # A crop is checked once cut: 200 x 1 of a 200 x 10 image (the whole image is not too thin).
        with pytest.raises(InvalidArgument, match=r"a 200x1 image is too thin for the model"):
            async with thin.embedded(ImageRef.from_bytes(png_bytes(synthetic_image(10, 200, seed=0)), 10**6),
                                     (0, 0, 200, 1)):
                pass
        assert len(decoded) == 1 and encoder.calls == 0

    asyncio.run(scenario())
