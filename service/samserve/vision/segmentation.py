"""Prompts in, masks out: pre-processing, the Triton decoder, and post-processing for one embedded image."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

from samserve.core import model_spec
from samserve.core.embedding import EmbeddedImage
from samserve.vision import processing


@dataclasses.dataclass(frozen=True)
class PromptMasks:
    """The answer to one prompt, masks in mask-token order (as the official ``SamPredictor.predict``)."""

    masks: np.ndarray
    """bool, K x H x W (K = 3 with multimask output, else 1), original image size."""
    iou_predictions: np.ndarray
    """float32, K."""
    low_res_logits: np.ndarray
    """float32, K x 4h x 4w: feed one back as ``Prompt.mask_input`` to refine."""
    stability_scores: np.ndarray
    """float32, K: IoU of the full-size masks at logit thresholds +1 and -1."""
    token_indices: list[int]
    """The mask token of each mask (0: single-mask output, 1..3: multimask outputs)."""


POSTPROCESS_THREADS = max(1, os.cpu_count() or 1)
POSTPROCESS_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=POSTPROCESS_THREADS, thread_name_prefix="samserve-postprocess"
)
T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M")


INLINE_PIXELS = 4_000_000
"""Mask work up to this many pixels in all runs on the event loop's thread: handing it to the pool costs more
(measured on the 2-core CPU: 3 RLE encodes of 768 x 1024 masks take 0.7 ms inline, 1.6 ms through the pool)."""

FULL_RESOLUTION_PIXELS_IN_FLIGHT = 64_000_000
"""Full-resolution planes being post-processed at once, in pixels, across all requests (each costs about 9 bytes
per pixel while it is worked on: float logits, thresholded copies, the encoded output): bounds the gateway's
memory at about 0.6 GB of planes however many cores the pool has and however large the image (a plane larger than
this runs alone)."""

PROMPTS_PER_DECODER_CALL = 64
"""A Segment's prompts go to the decoder in calls of at most this many; :data:`DECODER_CALLS_IN_FLIGHT` of them
at a time, each one's masks finished (encoded) and its logits dropped before the next starts, so a request's
memory does not grow with its prompt count."""
DECODER_CALLS_IN_FLIGHT = 2


class PixelBudget:
    """A weighted semaphore for threads: :meth:`held` waits until ``pixels`` fit (a request larger than the whole
    budget waits until it is the only holder)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        take = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self._used + take <= self.pixels)
            self._used += take
        try:
            yield
        finally:
            with self._changed:
                self._used -= take
                self._changed.notify_all()


FULL_RESOLUTION_BUDGET = PixelBudget(FULL_RESOLUTION_PIXELS_IN_FLIGHT)


async def map_in_pool(function: Callable[[T], R], items: Sequence[T], pixels_per_item: int) -> list[R]:
    """``[function(item) for item in items]``: inline when small (:data:`INLINE_PIXELS`), else on the
    post-processing threads (OpenCV, numpy and pycocotools release the GIL) in one chunk per thread, each item
    within :data:`FULL_RESOLUTION_BUDGET`."""
    if not items:
        return []
    if len(items) * pixels_per_item <= INLINE_PIXELS:
        return [function(item) for item in items]
    step = -(-len(items) // POSTPROCESS_THREADS)
    loop = asyncio.get_running_loop()

    def budgeted(item: T) -> R:
        with FULL_RESOLUTION_BUDGET.held(pixels_per_item):
            return function(item)

    def run(part: Sequence[T]) -> list[R]:
        return [budgeted(x) for x in part]

    chunks = await asyncio.gather(*(
        loop.run_in_executor(POSTPROCESS_POOL, run, items[i : i + step]) for i in range(0, len(items), step)
    ))
    return [result for chunk in chunks for result in chunk]


@dataclasses.dataclass(frozen=True)
class FinishedMask(Generic[M]):
    """What is kept of one full-size mask: what ``finish`` made of it, its score and area."""

    value: M
    stability_score: float
    area: int


@dataclasses.dataclass(frozen=True)
class PromptAnswer(Generic[M]):
    """The answer to one prompt with each full-size mask already finished (e.g. encoded), in mask-token order."""

    masks: list[FinishedMask[M]]
    iou_predictions: np.ndarray
    """float32, K."""
    low_res_logits: np.ndarray | None
    """float32, K x 4h x 4w (None when not kept)."""
    token_indices: list[int]


class PromptDecoder(Protocol):
    """SAM's prompt decoder, injected: :class:`samserve.triton.models.TritonSam` in the gateway, fakes in unit tests."""

    async def decode(
        self, image: EmbeddedImage, batch: processing.DecoderBatch, timeout_s: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """N prompts of one image: (low-res logits float32 N x M x 4h x 4w, predicted IoU float32 N x M)."""
        ...


Finish = Callable[[np.ndarray], M]
"""One H x W bool mask (stored column-major) -> what the caller keeps of it. The mask is a scratch plane of the
calling thread, valid during the call only: a ``finish`` that keeps the mask itself keeps a copy."""


async def segment_each(
    decoder: PromptDecoder,
    meta: model_spec.ModelMetadata,
    image: EmbeddedImage,
    prompts: Sequence[processing.Prompt],
    finish: Finish[M],
    timeout_s: float | None = None,
    keep_logits: bool = True,
) -> list[PromptAnswer[M]]:
    """Each prompt's masks, finished as they are made: prompts with the same token count share decoder calls of
    at most :data:`PROMPTS_PER_DECODER_CALL`; every mask is upscaled, thresholded, scored and passed to ``finish``
    on the post-processing threads, then dropped. Memory: a few decoder calls' logits and the finished values."""
    batches = processing.decoder_batches(prompts, image.original_size, image.input_size, meta.low_res_mask_size,
                                         PROMPTS_PER_DECODER_CALL)
    answers: dict[int, PromptAnswer[M]] = {}
    in_flight = asyncio.Semaphore(DECODER_CALLS_IN_FLIGHT)
    pixels = image.original_size[0] * image.original_size[1]

    def finished(plane: np.ndarray) -> FinishedMask[M]:
        thresholded = threshold_logits(plane, image, meta, scratch_mask=True)
        score = processing.stability_from_counts(thresholded.inner, thresholded.outer)
        return FinishedMask(finish(thresholded.mask), float(score), thresholded.area)

    async def run(batch: processing.DecoderBatch) -> None:
        async with in_flight:
            low_res, iou = await decoder.decode(image, batch, timeout_s)
            chosen = {index: processing.select_masks(prompts[index].multimask_output, meta.num_mask_tokens)
                      for index in batch.prompt_indices}
            planes = [plane for row, index in enumerate(batch.prompt_indices) for plane in low_res[row, chosen[index]]]
            done = await map_in_pool(finished, planes, pixels)
        start = 0
        for row, index in enumerate(batch.prompt_indices):
            tokens = chosen[index]
            count = processing.masks_returned(prompts[index].multimask_output, meta.num_mask_tokens)
            answers[index] = PromptAnswer(
                masks=done[start : start + count], iou_predictions=iou[row, tokens].copy(),
                low_res_logits=low_res[row, tokens].copy() if keep_logits else None,
                token_indices=list(range(meta.num_mask_tokens))[tokens],
            )
            start += count

    await asyncio.gather(*(run(batch) for batch in batches))
    return [answers[index] for index in range(len(prompts))]


async def segment(
    decoder: PromptDecoder,
    meta: model_spec.ModelMetadata,
    image: EmbeddedImage,
    prompts: Sequence[processing.Prompt],
    timeout_s: float | None = None,
) -> list[PromptMasks]:
    """Masks for each prompt as arrays (:func:`segment_each` keeping the masks themselves)."""
    answers = await segment_each(decoder, meta, image, prompts, np.copy, timeout_s)  # np.copy keeps the layout
    results = []
    for answer in answers:
        assert answer.low_res_logits is not None  # kept by default
        results.append(PromptMasks(
            masks=np.stack([m.value.T for m in answer.masks]).swapaxes(-1, -2),  # keep column-major storage
            iou_predictions=answer.iou_predictions,
            low_res_logits=answer.low_res_logits,
            stability_scores=np.array([m.stability_score for m in answer.masks], dtype=np.float32),
            token_indices=answer.token_indices,
        ))
    return results


def threshold_logits(
    logits: np.ndarray, image: EmbeddedImage, meta: model_spec.ModelMetadata,
    offset: float = processing.STABILITY_SCORE_OFFSET, scratch_mask: bool = False,
) -> processing.ThresholdedPlane:
    """One float32 4h x 4w logit plane -> its H x W bool mask (stored column-major), area and the pixel counts of
    the stability score at ``offset``. The full-size logits live in this thread's scratch planes; so does the mask
    with ``scratch_mask`` (valid until this thread's next call: no fresh memory, so no page faults, per mask),
    else only the mask leaves."""
    height, width = image.original_size
    stored = processing.upscale_plane(logits, image.input_size, image.original_size, meta.image_size)
    bounds = processing.logit_bounds(logits, image.input_size, meta.image_size)
    mask = processing.scratch_plane("mask", (width, height), np.bool_) if scratch_mask else None
    return processing.threshold_plane(stored, height, meta.mask_threshold, offset, mask, bounds)


def postprocess_plane(
    logits: np.ndarray, image: EmbeddedImage, meta: model_spec.ModelMetadata,
    offset: float = processing.STABILITY_SCORE_OFFSET,
    empty_stability: float = 1.0,
) -> tuple[np.ndarray, float]:
    """One 4h x 4w logit plane -> (H x W bool mask, stored column-major; stability score at ``offset``,
    ``empty_stability`` when no pixel passes the lower threshold), see :func:`threshold_logits`."""
    thresholded = threshold_logits(logits, image, meta, offset)
    score = processing.stability_from_counts(thresholded.inner, thresholded.outer, empty_stability)
    return thresholded.mask, float(score)
