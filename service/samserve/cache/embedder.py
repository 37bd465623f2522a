"""THE path from an image reference (+ crop) to an embedded image ready for the decoder.

Every RPC, the benchmarks and the parity tests take this path: decode the bytes (at most once per request, only
when needed), crop, resize and pad, run the encoder under the encode limiter, round-trip through the cache's fp16
form, stage for the decoder. The cache (:mod:`samserve.cache.embedding_cache`) makes it run once per image across
requests and
replicas. The image store (:mod:`samserve.cache.image_store`) keeps the bytes a request sent next to the embedding, so a
later request with the ``image_id`` alone gets any embedding it needs (a crop, an expired one) computed from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from samserve.cache.embedding_cache import EmbeddingCache, Missing
from samserve.cache.image_store import ImageStore
from samserve.core import metrics
from samserve.core.embedding import CropBox, EmbeddedImage, Embedding
from samserve.core.errors import InvalidArgument, NotFound, ResourceExhausted
from samserve.security import quotas
from samserve.vision import images, processing

if TYPE_CHECKING:  # the embedder takes any encoder with this method; unit tests give it fakes
    from samserve.triton.models import TritonSam

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


class DecodeBudget:
    """Image pixels being decoded and prepared at once (``SAMSERVE_MAX_DECODING_PIXELS``, shared by the requests of
    a gateway): a decode costs about 7 bytes per pixel at its peak (Pillow's image and the RGB array), so several
    60-megapixel images sent together wait here in turn instead of exhausting memory. An image larger than the
    whole budget waits until it is decoded alone."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def held(self, pixels: int) -> AsyncIterator[None]:
        take = min(pixels, self.pixels)
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + take <= self.pixels)
            self._used += take
        try:
            yield
        finally:
            self._used -= take
            async with self._changed:
                self._changed.notify_all()


class ImageRef:
    """A request's image: its id, its cache scope, and its encoded bytes when the request sent them or a cache miss
    took them from the image store (decoded at most once, only on a cache miss).

    ``scope`` partitions the cache (docs/security.md, cache scope): "" is the shared cache, where an image sent
    by anyone is a hit for everyone; a tenant's scope holds only what that tenant sent."""

    def __init__(self, image_id: str, data: bytes | None = None, max_pixels: int = 0, scope: str = "") -> None:
        self.image_id = image_id
        self.scope = scope
        self.keep_pixels = False
        """Keep the decoded pixels after the whole image's encode (GenerateMasks with crops encodes them again);
        else they are dropped as soon as the encoder's input is made."""
        self._data = data
        self._max_pixels = max_pixels
        self._pixels: np.ndarray | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_id(cls, image_id: str, max_pixels: int, field: str = "image_id", scope: str = "") -> ImageRef:
        """An image sent by reference: ``image_id`` must be what Embed returns (64 lowercase hex digits, the SHA-256
        of the bytes); anything else is INVALID_ARGUMENT naming ``field``, never a cache lookup."""
        if not images.IMAGE_ID.fullmatch(image_id):
            shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
            raise InvalidArgument(f"image_id {shown!r} is not an image id: 64 lowercase hex digits, as Embed returns",
                                  field=field)
        return cls(image_id, max_pixels=max_pixels, scope=scope)

    @classmethod
    def from_bytes(cls, data: bytes, max_pixels: int, field: str = "image", scope: str = "") -> ImageRef:
        """An image sent by value; its id is the content address of the bytes. Empty bytes are INVALID_ARGUMENT."""
        if not data:
            raise InvalidArgument("empty image", field=field)
        metrics.IMAGE_BYTES.observe(len(data))
        return cls(images.image_id(data), data, max_pixels, scope)

    def cache_id(self, crop: CropBox | None = None) -> str:
        """The cache id of the image (or of one crop's embedding) in its scope; the whole image's id is shared
        by Embed, Segment and GenerateMasks."""
        scoped = f"{self.scope}/{self.image_id}" if self.scope else self.image_id
        return scoped if crop is None else f"{scoped}:crop:{','.join(map(str, crop))}"

    @property
    def has_bytes(self) -> bool:
        return self._data is not None

    @property
    def data(self) -> bytes:
        """The encoded bytes (only once :attr:`has_bytes`)."""
        assert self._data is not None
        return self._data

    async def load(self, store: ImageStore) -> None:
        """Make sure the encoded bytes are here: sent with the request, else taken from ``store`` (once per
        request, however many crops need them). :class:`Missing` when the store does not have them either."""
        async with self._lock:
            if self._data is None:
                self._data = await store.get(self.cache_id(), self.image_id)
                if self._data is None:
                    raise Missing(self.image_id)

    def header_size(self) -> tuple[int, int]:
        """(width, height) from the image's header ((0, 0) when it has none: decoding will say why)."""
        assert self._data is not None
        return images.header_size(self._data)

    def drop_pixels(self) -> None:
        self._pixels = None

    async def pixels(self) -> np.ndarray:
        """uint8, H x W x 3 RGB, EXIF orientation applied (size-checked before decoding)."""
        assert self._data is not None
        async with self._lock:
            if self._pixels is None:
                self._pixels = await asyncio.to_thread(images.decode_image, self._data, self._max_pixels)
                metrics.IMAGE_PIXELS.observe(self._pixels.shape[0] * self._pixels.shape[1])
            return self._pixels


@dataclasses.dataclass
class ImageEmbedder:
    """Image reference (+ crop) -> :class:`EmbeddedImage`, through the cache. One per served model."""

    triton: TritonSam
    image_size: int
    """S of the served model's encoder input."""
    cache: EmbeddingCache
    limiter: EncodeLimiter
    decode_budget: DecodeBudget
    image_store: ImageStore
    """The encoded bytes behind the ids, shared by every model of the gateway."""

    def _refuse_too_thin(self, height: int, width: int) -> None:
        """INVALID_ARGUMENT when the short side of a ``width`` x ``height`` image resized to the encoder's input
        rounds to 0 pixels (a header without a size passes: decoding says why it is no image)."""
        if height and width and min(processing.resized_size((height, width), self.image_size)) < 1:
            raise InvalidArgument(f"a {width}x{height} image is too thin for the model: its short side "
                                  f"would be 0 pixels at the {self.image_size}-pixel input")

    @contextlib.asynccontextmanager
    async def embedded(
        self, image: ImageRef, crop: CropBox | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[tuple[EmbeddedImage, bool]]:
        """(embedded image, cached) held for the block. A missing embedding is computed from the bytes the request
        sent, else from those the image store kept; NOT_FOUND when neither exists. For a crop, ``original_size``
        is the crop's size. The bytes of the whole image are kept in the image store (:meth:`ImageStore.remember`)."""
        key = image.cache_id(crop)

        async def compute() -> Embedding:
            await image.load(self.image_store)
            quotas.charge(quotas.Limit.ENCODES)
            width, height = image.header_size()
            self._refuse_too_thin(height, width)  # before decoding: the orientation swaps the sides, never the ratio
            async with self.decode_budget.held(width * height):
                pixels = await image.pixels()
                if crop is not None:
                    x0, y0, x1, y1 = crop
                    pixels = pixels[y0:y1, x0:x1]
                    self._refuse_too_thin(*pixels.shape[:2])
                prepared = await asyncio.to_thread(processing.prepare_image, pixels, self.image_size)
                del pixels
                if not image.keep_pixels:
                    image.drop_pixels()
            async with self.limiter.slot():
                metrics.ENCODES.inc()
                return await self.triton.encode(prepared, timeout_s)

        try:
            async with self.cache.lease(key, compute) as (embedded, cached):
                if crop is None and image.has_bytes:
                    await self.image_store.remember(image.cache_id(), image.data, fresh=not cached)
                yield embedded, cached
        except Missing:
            what = "image_id" if crop is None else f"crop {crop} of image_id"
            raise NotFound(f"{what} {image.image_id} is unknown or expired; send the image bytes again") from None
