"""Prompts in, masks out: pre-processing, the Triton decoder, and post-processing for one embedded image."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from samserve import model_spec, processing
from samserve.embedding import EmbeddedImage

if TYPE_CHECKING:  # the decoder path itself needs no Triton import (unit tests run it on fakes)
    from samserve.triton_models import TritonSam


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


INLINE_PIXELS = 4_000_000
"""Mask work up to this many pixels in all runs on the event loop's thread: handing it to the pool costs more
(measured on the 2-core CPU: 3 RLE encodes of 768 x 1024 masks take 0.7 ms inline, 1.6 ms through the pool)."""


async def map_in_pool(function: Callable[[T], R], items: Sequence[T], pixels_per_item: int) -> list[R]:
    """``[function(item) for item in items]``: inline when small (:data:`INLINE_PIXELS`), else on the
    post-processing threads (OpenCV, numpy and pycocotools release the GIL) in one chunk per thread."""
    if not items:
        return []
    if len(items) * pixels_per_item <= INLINE_PIXELS:
        return [function(item) for item in items]
    step = -(-len(items) // POSTPROCESS_THREADS)
    loop = asyncio.get_running_loop()

    def run(part: Sequence[T]) -> list[R]:
        return [function(x) for x in part]

    chunks = await asyncio.gather(*(
        loop.run_in_executor(POSTPROCESS_POOL, run, items[i : i + step]) for i in range(0, len(items), step)
    ))
    return [result for chunk in chunks for result in chunk]


async def segment(
    triton: TritonSam,
    meta: model_spec.ModelMetadata,
    image: EmbeddedImage,
    prompts: Sequence[processing.Prompt],
    timeout_s: float | None = None,
) -> list[PromptMasks]:
    """Masks for each prompt; prompts with the same token count go to the decoder as one batch."""
    batches = processing.decoder_batches(prompts, image.original_size, image.input_size, meta.low_res_mask_size)
    decoded = await asyncio.gather(*(triton.decode(image, batch, timeout_s) for batch in batches))
    chosen: dict[int, tuple[np.ndarray, np.ndarray, slice]] = {}  # prompt index -> (logits, iou, tokens)
    for batch, (low_res, iou) in zip(batches, decoded, strict=True):
        for row, index in enumerate(batch.prompt_indices):
            tokens = processing.select_masks(prompts[index].multimask_output, meta.num_mask_tokens)
            chosen[index] = (low_res[row, tokens], iou[row, tokens], tokens)
    # Each mask is upscaled, thresholded and scored on its own, spread over the cores.
    planes = await map_in_pool(
        lambda plane: postprocess_plane(plane, image, meta),
        [plane for index in range(len(prompts)) for plane in chosen[index][0]],
        image.original_size[0] * image.original_size[1],
    )
    results, start = [], 0
    for index in range(len(prompts)):
        logits, iou, tokens = chosen[index]
        done, start = planes[start : start + len(logits)], start + len(logits)
        results.append(PromptMasks(
            masks=np.stack([mask.T for mask, _ in done]).swapaxes(-1, -2),  # keep column-major storage
            iou_predictions=iou,
            low_res_logits=logits,
            stability_scores=np.array([score for _, score in done], dtype=np.float32),
            token_indices=list(range(meta.num_mask_tokens))[tokens],
        ))
    return results


def postprocess_plane(
    logits: np.ndarray, image: EmbeddedImage, meta: model_spec.ModelMetadata,
    offset: float = processing.STABILITY_SCORE_OFFSET,
    empty_stability: float = 1.0,
) -> tuple[np.ndarray, float]:
    """One 4h x 4w logit plane -> (H x W bool mask, stored column-major; stability score at ``offset``,
    ``empty_stability`` when no pixel passes the lower threshold)."""
    full = processing.upscale_logits(logits, image.input_size, image.original_size, meta.image_size)
    score = processing.stability_score(full, meta.mask_threshold, offset, empty_stability)
    return processing.binarize(full, meta.mask_threshold), float(score)
