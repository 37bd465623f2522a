"""Pre/post-processing rules that need no reference implementation: prompt tokens, decoder batches, thresholds,
mask selection, model metadata and the Triton configs' contract names. The comparisons with the official
implementation are in tests/reference/test_processing.py."""

from __future__ import annotations

import numpy as np
import pytest

from samserve.vision import processing


def test_prepare_image_rejects_non_rgb():
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        processing.prepare_image(np.zeros((10, 10), np.uint8), 64)
    with pytest.raises(ValueError):
        processing.prepare_image(np.zeros((10, 10, 3), np.float32), 64)


def test_point_inputs_layout():
    original, resized = (100, 200), (512, 1024)
    # Points only: a padding point (0, 0) with label -1 is appended, as PromptEncoder does without a box.
    coords, labels = processing.point_inputs(
        processing.Prompt(points=np.array([[10, 20], [30, 40]]), labels=np.array([1, 0])), original, resized
    )
    np.testing.assert_array_equal(labels, [1, 0, -1])
    np.testing.assert_allclose(coords, [[51.2, 102.4], [153.6, 204.8], [0, 0]], rtol=1e-6)
    # Box only: two corners, labels 2 and 3, no padding point.
    coords, labels = processing.point_inputs(processing.Prompt(box=np.array([10, 20, 30, 40])), original, resized)
    np.testing.assert_array_equal(labels, [2, 3])
    np.testing.assert_allclose(coords, [[51.2, 102.4], [153.6, 204.8]], rtol=1e-6)
    # Points and a box: points first, then the corners.
    _, labels = processing.point_inputs(
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


def previous_upscale_logits(low_res: np.ndarray, input_hw, original_hw, image_size: int) -> np.ndarray:
    """The post-processing numerics before :func:`processing.upscale_plane`, verbatim (float32 ... x H x W, a
    transposed view of ... x W x H): the reference the faster path must equal bit for bit."""
    import cv2

    lead = low_res.shape[:-2]
    planes = low_res.reshape(-1, *low_res.shape[-2:])
    h, w = input_hw
    out_h, out_w = original_hw
    low_h, low_w = planes.shape[-2:]
    scale_h, scale_w = image_size // low_h, image_size // low_w
    keep_h, keep_w = min(low_h, -(-h // scale_h) + 1), min(low_w, -(-w // scale_w) + 1)
    out = np.empty((planes.shape[0], out_w, out_h), dtype=np.float32)
    padded = np.empty((keep_w * scale_w, keep_h * scale_h), dtype=np.float32)
    for k, plane in enumerate(planes):
        cv2.resize(np.ascontiguousarray(plane[:keep_h, :keep_w].T), padded.shape[::-1], dst=padded,
                   interpolation=cv2.INTER_LINEAR)
        if (out_h, out_w) == (h, w):
            out[k] = padded[:w, :h]
        else:
            cv2.resize(padded[:w, :h], (out_h, out_w), dst=out[k], interpolation=cv2.INTER_LINEAR)
    return out.reshape(*lead, out_w, out_h).swapaxes(-1, -2)


POSTPROCESS_SIZES = [(37, 53), (53, 37), (480, 640), (600, 338), (768, 1024), (1024, 768), (1024, 1024),
                     (1500, 2000), (512, 384), (3, 1024), (1, 1500)]


def logit_planes(seed: int = 0) -> dict[str, np.ndarray]:
    """256 x 256 logit planes of different kinds: wide and narrow (every value within the stability band, as with
    random weights) noise, smooth blobs, all above / all below / exactly at the threshold, tiny values."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256].astype(np.float32)
    smooth = cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), 4) * 30
    return {
        "wide": rng.normal(size=(256, 256)).astype(np.float32) * 4,
        "narrow": rng.uniform(-0.3, 0.3, (256, 256)).astype(np.float32),
        "blob": ((40 - np.hypot(yy - 90, xx - 120)) * 0.5 + smooth).astype(np.float32),
        "above": rng.uniform(2, 9, (256, 256)).astype(np.float32),
        "below": rng.uniform(-9, -2, (256, 256)).astype(np.float32),
        "zero": np.zeros((256, 256), np.float32),
        "tiny": (rng.normal(size=(256, 256)) * 1e-38).astype(np.float32),
    }


@pytest.mark.parametrize("original", POSTPROCESS_SIZES)
def test_upscale_plane_and_threshold_plane_equal_the_previous_path_bitwise(original):
    input_hw = processing.resized_size(original, 1024)
    height, width = original
    for name, plane in logit_planes().items():
        expected = previous_upscale_logits(plane, input_hw, original, 1024)
        np.testing.assert_array_equal(processing.upscale_logits(plane, input_hw, original, 1024), expected)
        stored = processing.upscale_plane(plane, input_hw, original, 1024)
        assert stored.shape[0] == width and stored.shape[1] >= height and stored.flags.c_contiguous
        np.testing.assert_array_equal(stored[:, :height].T, expected)
        assert (stored[:, height:] == -np.inf).all()
        low, high = processing.logit_bounds(plane, input_hw, 1024)
        assert low < expected.min() and expected.max() < high
        for threshold, offset in [(0.0, 1.0), (0.0, 0.7), (0.5, 0.05)]:
            want_mask = processing.binarize(expected, threshold)
            want_score = processing.stability_score(expected, threshold, offset)
            for bounds in (None, (low, high)):
                for into in (None, np.empty((width, height), bool)):
                    got = processing.threshold_plane(stored, height, threshold, offset, into, bounds)
                    assert got.mask.shape == (height, width) and got.mask.T.flags.c_contiguous, name
                    np.testing.assert_array_equal(got.mask, want_mask, err_msg=name)
                    assert got.area == int(processing.mask_areas(want_mask)), name
                    score = processing.stability_from_counts(got.inner, got.outer)
                    assert score.tobytes() == want_score.tobytes(), (name, threshold, offset)


def test_stability_from_counts_empty():
    assert float(processing.stability_from_counts(0, 0)) == 1.0
    assert np.isnan(processing.stability_from_counts(0, 0, float("nan")))
    assert float(processing.stability_from_counts(1, 3)) == np.float32(1 / 3)


def test_postprocess_plane_equals_the_previous_path():
    """segmentation's per-plane post-processing (scratch mask or not) against the previous numerics."""
    from types import SimpleNamespace

    from samserve.core.embedding import EmbeddedImage, Embedding, Staged
    from samserve.vision import segmentation

    meta = SimpleNamespace(image_size=1024, mask_threshold=0.0)
    for original in [(768, 1024), (480, 640)]:
        input_hw = processing.resized_size(original, 1024)
        image = EmbeddedImage(Embedding(np.zeros((1, 1, 1), np.float32), original, input_hw), Staged())
        for plane in logit_planes(seed=3).values():
            expected = previous_upscale_logits(plane, input_hw, original, 1024)
            mask, score = segmentation.postprocess_plane(plane, image, meta, 1.0, float("nan"))
            np.testing.assert_array_equal(mask, expected > 0.0)
            want = processing.stability_score(expected, 0.0, 1.0, float("nan"))
            assert np.float32(score).tobytes() == want.tobytes()
            scratch = segmentation.threshold_logits(plane, image, meta, scratch_mask=True)
            np.testing.assert_array_equal(scratch.mask, mask)
            assert scratch.area == int((expected > 0.0).sum())
