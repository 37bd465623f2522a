"""Pre/post-processing rules that need no reference implementation: prompt tokens, decoder batches, thresholds,
mask selection, model metadata and the Triton configs' contract names. The comparisons with the official
implementation are in tests/reference/test_processing.py."""

from __future__ import annotations

import numpy as np
import pytest

from samserve import processing


def test_prepare_image_rejects_non_rgb():
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        processing.prepare_image(np.zeros((10, 10), np.uint8), 64)
    with pytest.raises(ValueError):
        processing.prepare_image(np.zeros((10, 10, 3), np.float32), 64)


def test_prompt_tokens_layout():
    original, resized = (100, 200), (512, 1024)
    # Points only: a padding point (0, 0) with label -1 is appended, as PromptEncoder does without a box.
    coords, labels = processing.prompt_tokens(
        processing.Prompt(points=np.array([[10, 20], [30, 40]]), labels=np.array([1, 0])), original, resized
    )
    np.testing.assert_array_equal(labels, [1, 0, -1])
    np.testing.assert_allclose(coords, [[51.2, 102.4], [153.6, 204.8], [0, 0]], rtol=1e-6)
    # Box only: two corners, labels 2 and 3, no padding point.
    coords, labels = processing.prompt_tokens(processing.Prompt(box=np.array([10, 20, 30, 40])), original, resized)
    np.testing.assert_array_equal(labels, [2, 3])
    np.testing.assert_allclose(coords, [[51.2, 102.4], [153.6, 204.8]], rtol=1e-6)
    # Points and a box: points first, then the corners.
    _, labels = processing.prompt_tokens(
        processing.Prompt(points=np.array([[1, 1]]), labels=np.array([1]), box=np.array([0, 0, 5, 5])),
        original, resized,
    )
    np.testing.assert_array_equal(labels, [1, 2, 3])
    assert coords.dtype == np.float32 and labels.dtype == np.float32


def test_decoder_batches_group_by_token_count_and_keep_order():
    prompts = [
        processing.Prompt(points=np.array([[1, 1]]), labels=np.array([1])),  # 2 tokens
        processing.Prompt(box=np.array([0, 0, 4, 4])),  # 2 tokens
        processing.Prompt(points=np.array([[1, 1], [2, 2]]), labels=np.array([1, 0]),
                          mask_input=np.ones((64, 64), np.float32)),  # 3 tokens
    ]
    batches = processing.decoder_batches(prompts, (10, 10), (256, 256), (64, 64))
    assert sorted(b.prompt_indices for b in batches) == [[0, 1], [2]]
    two = next(b for b in batches if b.prompt_indices == [0, 1])
    three = next(b for b in batches if b.prompt_indices == [2])
    assert two.point_coords.shape == (2, 2, 2) and two.mask_input.shape == (2, 1, 64, 64)
    np.testing.assert_array_equal(two.has_mask_input, [0, 0])
    np.testing.assert_array_equal(three.has_mask_input, [1])
    assert three.mask_input.sum() == 64 * 64


def test_decoder_batches_reject_wrong_mask_size():
    prompt = processing.Prompt(points=np.array([[1, 1]]), labels=np.array([1]), mask_input=np.zeros((256, 256)))
    with pytest.raises(ValueError, match="mask_input"):
        processing.decoder_batches([prompt], (10, 10), (256, 256), (64, 64))


def test_binarize_uses_the_model_threshold_not_one_half():
    logits = np.array([[-0.1, 0.0], [0.2, 0.6]], np.float32)
    np.testing.assert_array_equal(processing.binarize(logits, 0.0), [[False, False], [True, True]])


def test_select_masks():
    assert processing.select_masks(True, 4) == slice(1, 4)
    assert processing.select_masks(False, 4) == slice(0, 1)


def test_a_scratch_plane_is_reused_by_its_thread_only_and_never_kept_when_large():
    import threading

    first = processing.scratch_plane("test", (4, 5))
    again = processing.scratch_plane("test", (3, 2))
    assert again.shape == (3, 2) and np.shares_memory(first, again)  # the same memory, reshaped
    other: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: other.append(processing.scratch_plane("test", (4, 5))))
    worker.start()
    worker.join()
    assert not np.shares_memory(first, other[0])
    side = int((processing.SCRATCH_MAX_BYTES // 4) ** 0.5) + 1
    large = processing.scratch_plane("test", (side, side))
    assert not np.shares_memory(large, processing.scratch_plane("test", (side, side)))
