"""The bounds that keep one request's memory in check: pixels being decoded (asyncio), full-size planes being
post-processed (threads), bytes of an answer; and that a Segment's decoder calls are split."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from samserve.cache.embedder import DecodeBudget
from samserve.core.api import pb
from samserve.core.errors import ResourceExhausted
from samserve.transport.convert import MaskEncoding, ResponseBudget, mask_encoder
from samserve.vision import processing
from samserve.vision.segmentation import PixelBudget


def test_decodes_wait_for_pixels_and_an_oversized_one_runs_alone():
    async def scenario() -> list[tuple[str, int]]:
        budget = DecodeBudget(100)
        events: list[tuple[str, int]] = []
        gates = {name: asyncio.Event() for name in ("a", "b", "huge")}

        async def decode(name: str, pixels: int) -> None:
            async with budget.held(pixels):
                events.append((name, budget._used))
                await gates[name].wait()

        tasks = [asyncio.create_task(decode("a", 60)), asyncio.create_task(decode("b", 60)),
                 asyncio.create_task(decode("huge", 500))]
        await asyncio.sleep(0)
        assert events == [("a", 60)]  # b does not fit beside a; huge waits behind
        gates["a"].set()
        await asyncio.wait_for(_until(lambda: len(events) == 2), 5)
        gates["b"].set()
        await asyncio.wait_for(_until(lambda: len(events) == 3), 5)
        gates["huge"].set()
        await asyncio.gather(*tasks)
        assert budget._used == 0
        return events

    assert asyncio.run(scenario()) == [("a", 60), ("b", 60), ("huge", 100)]


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_planes_in_flight_stay_within_the_pixel_budget():
    budget = PixelBudget(100)
    peak, used, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(4, timeout=5)

    def work(pixels: int) -> None:
        barrier.wait()
        with budget.held(pixels):
            with lock:
                used[0] += min(pixels, 100)
                peak[0] = max(peak[0], used[0])
            with lock:
                used[0] -= min(pixels, 100)

    threads = [threading.Thread(target=work, args=(p,)) for p in (40, 40, 40, 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads) and peak[0] <= 100


def test_an_answer_stops_at_its_byte_limit():
    noisy = np.random.default_rng(0).random((64, 64)) > 0.5
    both = MaskEncoding.of(pb.SegmentRequest(mask_encoding=pb.MASK_ENCODING_RLE_AND_PNG))
    encoded = mask_encoder(both, ResponseBudget(10**9))(noisy)
    assert encoded.rle is not None and encoded.png and encoded.polygons is None
    size = len(encoded.png) + len(encoded.rle["counts"])
    budget = ResponseBudget(max_bytes=2 * size)
    encode = mask_encoder(both, budget)
    encode(noisy)
    encode(noisy)
    with pytest.raises(ResourceExhausted, match="SAMSERVE_MAX_RESPONSE_BYTES") as refused:
        encode(noisy)
    assert refused.value.quota == "max_response_bytes" and budget.spent == 3 * size


def test_polygons_are_charged_to_the_answer_budget_too():
    noisy = np.random.default_rng(0).random((64, 64)) > 0.5
    outlines = MaskEncoding.of(pb.SegmentRequest(mask_encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=0))
    encoded = mask_encoder(outlines, ResponseBudget(10**9))(noisy)
    assert encoded.rle is None and not encoded.png and encoded.polygons.rings
    with pytest.raises(ResourceExhausted, match="SAMSERVE_MAX_RESPONSE_BYTES"):
        mask_encoder(outlines, ResponseBudget(encoded.polygons.ByteSize() - 1))(noisy)


def test_a_segment_is_split_into_decoder_calls_of_bounded_size():
    prompts = [processing.Prompt(points=np.array([[float(i), 1.0]]), labels=np.array([1.0]), box=None,
                                 mask_input=None, multimask_output=True) for i in range(150)]
    batches = processing.decoder_batches(prompts, (100, 200), (512, 1024), (256, 256), max_prompts=64)
    assert [len(b.prompt_indices) for b in batches] == [64, 64, 22]
    assert sorted(i for b in batches for i in b.prompt_indices) == list(range(150))
    assert processing.masks_returned(True, 4) == 3 and processing.masks_returned(False, 4) == 1
