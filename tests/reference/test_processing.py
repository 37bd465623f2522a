"""Pre/post-processing against the official implementation (segment_anything.utils.transforms, Sam); the rules
that need no reference are in tests/unit/test_processing.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F

from samserve.vision import processing
from samserve_dev.images import synthetic_image

SIZES = [(37, 53), (53, 37), (480, 640), (600, 338), (1, 1500), (1024, 1024), (777, 1001)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("target", [256, 1024])
def test_resized_size_matches_official(hw, target):
    assert processing.resized_size(hw, target) == ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], target)


@pytest.mark.parametrize("hw", [(37, 53), (480, 640), (600, 338)])
def test_prepare_image_matches_official_resize_and_pads_with_zeros(hw):
    image = synthetic_image(*hw, seed=1)
    official = ResizeLongestSide(1024).apply_image(image)
    prepared = processing.prepare_image(image, 1024)
    h, w = prepared.input_size
    assert (h, w) == official.shape[:2]
    assert prepared.original_size == hw
    assert prepared.padded.shape == (1024, 1024, 3) and prepared.padded.dtype == np.uint8
    np.testing.assert_array_equal(prepared.padded[:h, :w], official)
    assert not prepared.padded[h:].any() and not prepared.padded[:, w:].any()


def test_scale_coords_matches_official():
    coords = np.array([[0.0, 0.0], [52.0, 36.0], [10.5, 20.25]])
    official = ResizeLongestSide(1024).apply_coords(coords, (37, 53))
    ours = processing.scale_coords(coords, (37, 53), processing.resized_size((37, 53), 1024))
    np.testing.assert_allclose(ours, official)


def official_postprocess(low_res: np.ndarray, input_hw, original_hw, image_size: int) -> np.ndarray:
    """``Sam.postprocess_masks`` (the official code, reproduced without building a model)."""
    masks = F.interpolate(torch.from_numpy(low_res), (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(masks, original_hw, mode="bilinear", align_corners=False).numpy()


@pytest.mark.parametrize("original", [(37, 53), (480, 640), (600, 338), (1500, 2000), (768, 1024), (1024, 1024),
                                      (3, 1024)])
def test_upscale_logits_matches_official_postprocess(original):
    rng = np.random.default_rng(0)
    low_res = rng.normal(size=(2, 3, 256, 256)).astype(np.float32) * 4
    input_hw = processing.resized_size(original, 1024)
    expected = official_postprocess(low_res, input_hw, original, 1024)
    got = processing.upscale_logits(low_res, input_hw, original, 1024)
    assert got.shape == expected.shape == (2, 3, *original)
    into = np.empty((2, 3, original[1], original[0]), dtype=np.float32)  # a given buffer gets the same values
    np.testing.assert_array_equal(processing.upscale_logits(low_res, input_hw, original, 1024, out=into), got)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    agreement = (processing.binarize(got, 0.0) == (expected > 0.0)).mean()
    assert agreement > 0.9999


def test_stability_score_matches_official():
    logits = np.random.default_rng(3).normal(size=(4, 64, 64)).astype(np.float32) * 3
    official = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(processing.stability_score(logits, 0.0, 1.0), official, rtol=1e-6)


