"""Pre/post-processing against the official implementation (segment_anything.utils.transforms, Sam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F

from samserve import model_spec, processing
from tests.support.images import synthetic_image

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


def test_prepare_image_rejects_non_rgb():
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        processing.prepare_image(np.zeros((10, 10), np.uint8), 64)
    with pytest.raises(ValueError):
        processing.prepare_image(np.zeros((10, 10, 3), np.float32), 64)


def test_scale_coords_matches_official():
    coords = np.array([[0.0, 0.0], [52.0, 36.0], [10.5, 20.25]])
    official = ResizeLongestSide(1024).apply_coords(coords, (37, 53))
    ours = processing.scale_coords(coords, (37, 53), processing.resized_size((37, 53), 1024))
    np.testing.assert_allclose(ours, official)


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
        processing.Prompt(points=np.array([[1, 1]]), labels=np.array([1]), box=np.array([0, 0, 5, 5])), original, resized
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


def official_postprocess(low_res: np.ndarray, input_hw, original_hw, image_size: int) -> np.ndarray:
    """``Sam.postprocess_masks`` (the official code, reproduced without building a model)."""
    masks = F.interpolate(torch.from_numpy(low_res), (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(masks, original_hw, mode="bilinear", align_corners=False).numpy()


@pytest.mark.parametrize("original", [(37, 53), (480, 640), (600, 338), (1500, 2000)])
def test_upscale_logits_matches_official_postprocess(original):
    rng = np.random.default_rng(0)
    low_res = rng.normal(size=(2, 3, 256, 256)).astype(np.float32) * 4
    input_hw = processing.resized_size(original, 1024)
    expected = official_postprocess(low_res, input_hw, original, 1024)
    got = processing.upscale_logits(low_res, input_hw, original, 1024)
    assert got.shape == expected.shape == (2, 3, *original)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    agreement = (processing.binarize(got, 0.0) == (expected > 0.0)).mean()
    assert agreement > 0.9999


def test_binarize_uses_the_model_threshold_not_one_half():
    logits = np.array([[-0.1, 0.0], [0.2, 0.6]], np.float32)
    np.testing.assert_array_equal(processing.binarize(logits, 0.0), [[False, False], [True, True]])


def test_stability_score_matches_official():
    logits = np.random.default_rng(3).normal(size=(4, 64, 64)).astype(np.float32) * 3
    official = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(processing.stability_score(logits, 0.0, 1.0), official, rtol=1e-6)


def test_select_masks():
    assert processing.select_masks(True, 4) == slice(1, 4)
    assert processing.select_masks(False, 4) == slice(0, 1)


def test_metadata_roundtrip_and_strictness(tmp_path):
    meta = model_spec.ModelMetadata(
        model_id="m", variant="tiny", weights_sha256="ab" * 32, image_size=256, embedding_shape=(64, 16, 16),
        low_res_mask_size=(64, 64), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(1.0, 2.0, 3.0),
        pixel_std=(4.0, 5.0, 6.0), preprocessing_version=1, exporter_version="x",
    )
    meta.write(tmp_path)
    assert model_spec.ModelMetadata.read(tmp_path) == meta
    with pytest.raises(ValueError, match="unknown"):
        model_spec.ModelMetadata.from_json(meta.to_json()[:-1] + ', "surprise": 1}')
    assert meta.cache_namespace == f"m:{'ab' * 32}:pp1"


@pytest.mark.parametrize(
    "model, inputs, outputs",
    [
        (model_spec.ENCODER_MODEL, model_spec.ENCODER_INPUTS, model_spec.ENCODER_OUTPUTS),
        (model_spec.DECODER_MODEL, model_spec.DECODER_INPUTS, model_spec.DECODER_OUTPUTS),
    ],
)
def test_triton_configs_declare_the_contract_names(model, inputs, outputs):
    """config.pbtxt must name the tensors exactly as model_spec does, and batch (max_batch_size > 0)."""
    import re

    from samserve_build.repository import SOURCE_REPOSITORY

    config = (SOURCE_REPOSITORY / model / "config.pbtxt").read_text()
    sections = {key: re.findall(r'name: "(\w+)"', body) for key, body in re.findall(r"\n(input|output) \[(.*?)\n\]", config, re.S)}
    assert sections["input"] == list(inputs)
    assert sections["output"] == list(outputs)
    assert f'name: "{model}"' in config
    assert int(re.search(r"max_batch_size: (\d+)", config).group(1)) > 0
    assert "dynamic_batching" in config
