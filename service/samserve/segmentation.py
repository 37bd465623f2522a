"""Prompts in, masks out: pre-processing, the Triton decoder, and post-processing for one embedded image."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import numpy as np

from samserve import model_spec, processing
from samserve.triton_models import StagedEmbedding, TritonSam


@dataclasses.dataclass(frozen=True)
class EmbeddedImage:
    """An image's embedding and the sizes needed to post-process masks for it."""

    embedding: StagedEmbedding
    """float32, C x h x w, staged for the decoder (see TritonSam.stage_embedding)."""
    original_size: tuple[int, int]
    """(H, W) of the original image."""
    input_size: tuple[int, int]
    """(h, w) of the resized image inside the encoder's S x S input."""


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


STABILITY_OFFSET = 1.0


async def embed(
    triton: TritonSam, meta: model_spec.ModelMetadata, image: np.ndarray, timeout_s: float | None = None
) -> EmbeddedImage:
    """Encode an H x W x 3 uint8 RGB image and stage its embedding for decoder calls."""
    prepared = processing.prepare_image(image, meta.image_size)
    embedding = await triton.stage_embedding(await triton.encode(prepared, timeout_s))
    return EmbeddedImage(embedding=embedding, original_size=prepared.original_size, input_size=prepared.input_size)


async def segment(
    triton: TritonSam,
    meta: model_spec.ModelMetadata,
    image: EmbeddedImage,
    prompts: Sequence[processing.Prompt],
    timeout_s: float | None = None,
) -> list[PromptMasks]:
    """Masks for each prompt; prompts with the same token count go to the decoder as one batch."""
    batches = processing.decoder_batches(prompts, image.original_size, image.input_size, meta.low_res_mask_size)
    decoded = await asyncio.gather(*(triton.decode(image.embedding, batch, timeout_s) for batch in batches))
    results: list[PromptMasks | None] = [None] * len(prompts)
    for batch, (low_res, iou) in zip(batches, decoded):
        for row, index in enumerate(batch.prompt_indices):
            chosen = processing.select_masks(prompts[index].multimask_output, meta.num_mask_tokens)
            logits = low_res[row, chosen]
            full = processing.upscale_logits(logits, image.input_size, image.original_size, meta.image_size)
            results[index] = PromptMasks(
                masks=processing.binarize(full, meta.mask_threshold),
                iou_predictions=iou[row, chosen],
                low_res_logits=logits,
                stability_scores=processing.stability_score(full, meta.mask_threshold, STABILITY_OFFSET),
                token_indices=list(range(meta.num_mask_tokens))[chosen],
            )
    return [result for result in results if result is not None]
