"""Segment everything, algorithm level: samserve.vision.amg against the official code.

The building blocks (grids, crop boxes, boxes of masks, NMS, edge filter, small regions) against the official
functions on the same inputs; then the whole generator against the official ``SamAutomaticMaskGenerator`` with
the same decoder outputs (a scene of shapes standing in for SAM's decoder, so the default thresholds keep real
masks): same masks, same records, for the defaults, crop layers and small-region removal.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch
from segment_anything.utils import amg as official
from torchvision.ops import batched_nms

from samserve.core import model_spec
from samserve.core.embedding import EmbeddedImage, Embedding, Staged
from samserve.vision import amg, mask_encoding, processing
from samserve_build import architectures
from samserve_dev.amg_reference import SceneDecoder, match, official_generate

IMAGE_SIZE, LOW_RES = 256, 64
META = model_spec.ModelMetadata(
    model_id="scene", variant="tiny", weights_sha256="0" * 64, image_size=IMAGE_SIZE,
    embedding_shape=(64, 16, 16), low_res_mask_size=(LOW_RES, LOW_RES), num_mask_tokens=4, mask_threshold=0.0,
    pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375), preprocessing_version=1,
    exporter_version="test",
)


def test_point_grids_match_official():
    params = amg.AmgParams(points_per_side=12, crop_n_layers=2, crop_n_points_downscale_factor=2)
    ours = params.grids()
    theirs = official.build_all_layer_point_grids(12, 2, 2)
    assert [g.shape for g in ours] == [g.shape for g in theirs] == [(144, 2), (36, 2), (9, 2)]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hw", [(768, 1024), (1000, 333), (37, 53)])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_crop_boxes_match_official(hw, layers):
    boxes, levels = official.generate_crop_boxes(hw, layers, 512 / 1500)
    assert amg.crop_boxes(hw, layers, 512 / 1500) == [(tuple(b), level) for b, level in zip(boxes, levels, strict=True)]


def random_masks(rng, k=40, hw=(50, 70)) -> np.ndarray:
    masks = np.zeros((k, *hw), dtype=bool)
    for i in range(k - 2):  # the last two stay empty
        y0, x0 = rng.integers(0, hw[0]), rng.integers(0, hw[1])
        masks[i, y0 : y0 + rng.integers(1, 20), x0 : x0 + rng.integers(1, 30)] = True
        masks[i] &= rng.random(hw) < 0.9
    return masks


def test_mask_boxes_match_official_including_empty_masks():
    masks = random_masks(np.random.default_rng(0))
    expected = official.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(amg.mask_boxes(masks), expected)
    column_major = np.asfortranarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_array_equal(amg.mask_boxes(column_major), expected)


@pytest.mark.parametrize("threshold", [0.3, 0.7, 1.0])
def test_box_nms_matches_torchvision_with_ties_and_degenerate_boxes(threshold):
    rng = np.random.default_rng(1)
    xy = rng.integers(0, 60, size=(300, 2))
    boxes = np.concatenate([xy, xy + rng.integers(0, 30, size=(300, 2))], axis=1).astype(np.float32)
    scores = rng.choice([0.5, 0.7, 0.9], size=300).astype(np.float32)  # many ties: order must be stable
    expected = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(300), threshold).numpy()
    kept = amg.box_nms(boxes, scores, threshold)
    np.testing.assert_array_equal(kept, expected)
    assert threshold == 1.0 or len(kept) < 300


def test_near_crop_edge_matches_official():
    rng = np.random.default_rng(2)
    boxes = rng.integers(0, 400, size=(200, 4))
    boxes[:, 2:] = boxes[:, :2] + rng.integers(0, 200, size=(200, 2))
    crop, hw = (150, 0, 600, 420), (420, 800)
    expected = official.is_box_near_crop_edge(torch.from_numpy(boxes), list(crop), [0, 0, hw[1], hw[0]]).numpy()
    flagged = amg.near_crop_edge(boxes, crop, hw)
    np.testing.assert_array_equal(flagged, expected)
    assert 0 < flagged.sum() < len(flagged)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_official(mode):
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((60, 80)) < rng.uniform(0.2, 0.8)
        for area in (3, 30):
            ours, changed = amg.remove_small_regions(mask, area, mode)
            theirs, their_changed = official.remove_small_regions(mask, area, mode)
            assert changed == their_changed
            np.testing.assert_array_equal(ours, theirs)


# -- the whole generator ------------------------------------------------------------------------------------
HW = (300, 400)


def ours_generate(decoder: SceneDecoder, **params) -> tuple[amg.MaskSet, list[dict]]:
    @contextlib.asynccontextmanager
    async def crop_embedding(crop):
        crop_hw = (crop[3] - crop[1], crop[2] - crop[0])
        input_hw = processing.resized_size(crop_hw, IMAGE_SIZE)
        yield EmbeddedImage(Embedding(np.asarray(crop), crop_hw, input_hw), Staged())

    async def decode(image: EmbeddedImage, batch: processing.DecoderBatch):
        crop = tuple(int(v) for v in image.embedding.array)
        return decoder(batch.point_coords[:, 0], crop, image.input_size, image.original_size)

    generator = amg.MaskGenerator(amg.AmgParams(**params), META, decode, crop_embedding)
    masks = asyncio.run(generator.generate(HW))
    return masks, masks.whole_frame_rles(HW)


@pytest.fixture(scope="module")
def scene():
    sam = architectures.build_sam(architectures.ARCHITECTURES["tiny"])
    return sam, SceneDecoder(HW, seed=7, image_size=IMAGE_SIZE, low_res=LOW_RES), np.zeros((*HW, 3), np.uint8)


@pytest.mark.parametrize("params", [
    dict(points_per_side=16),
    dict(points_per_side=16, crop_n_layers=1),
    dict(points_per_side=16, min_mask_region_area=60),
    dict(points_per_side=12, crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=60,
         points_per_batch=20),
], ids=["defaults", "crop_layers_1", "min_region_area", "all"])
def test_generator_matches_official_on_the_same_decoder_outputs(scene, params):
    sam, decoder, image = scene
    expected = official_generate(sam, decoder, image, **params)
    masks, rles = ours_generate(decoder, **params)
    assert len(expected) >= 10, "the scene must leave real masks after the default thresholds"
    result = match([e["segmentation"] for e in expected], rles)
    assert abs(result.count_ratio - 1) <= 0.02 and result.matched_fraction >= 0.95, result
    # The matched records agree field by field.
    for theirs_index, ours_index, _ in result.pairs:
        theirs = expected[theirs_index]
        assert abs(theirs["predicted_iou"] - masks.predicted_iou[ours_index]) < 1e-5
        assert abs(theirs["stability_score"] - masks.stability_score[ours_index]) < 0.01
        np.testing.assert_allclose(theirs["point_coords"][0], masks.points[ours_index], atol=1e-3)
        x0, y0, x1, y1 = masks.crop_boxes[ours_index]
        assert theirs["crop_box"] == [x0, y0, x1 - x0, y1 - y0]
        bx0, by0, bx1, by1 = masks.boxes[ours_index]
        np.testing.assert_allclose(theirs["bbox"], [bx0, by0, bx1 - bx0, by1 - by0], atol=2)
    if params.get("crop_n_layers"):
        assert any(e["crop_box"] != [0, 0, HW[1], HW[0]] for e in expected), "crop masks must take part"


def test_min_region_area_changes_masks(scene):
    """The scene has holes and islands: the small-region pass must change some masks (else the case above
    proves nothing)."""
    _, decoder, _ = scene
    plain, _ = ours_generate(decoder, points_per_side=16)
    cleaned, _ = ours_generate(decoder, points_per_side=16, min_mask_region_area=60)
    areas = lambda s: sorted(mask_encoding.rle_areas(s.masks).tolist())  # noqa: E731
    assert areas(plain) != areas(cleaned)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_low_res_stability_estimate_is_close_to_the_exact_score(seed):
    """The pre-filter's premise: on real shapes, masks that score >= 0.9 exactly are underestimated by less than
    the margin (or are small enough to skip the estimate), so no mask that passes a threshold is pre-filtered."""
    decoder = SceneDecoder(HW, seed=seed, image_size=IMAGE_SIZE, low_res=LOW_RES)
    input_hw = processing.resized_size(HW, IMAGE_SIZE)
    image = EmbeddedImage(Embedding(np.zeros(1), HW, input_hw), Staged())
    points = amg.build_point_grid(16) * np.array([[HW[1], HW[0]]])
    logits, _ = decoder(processing.scale_coords(points, HW, input_hw), (0, 0, HW[1], HW[0]), input_hw, HW)
    planes = logits[:, 1:].reshape(-1, LOW_RES, LOW_RES)
    estimate, outer = amg.low_res_stability(planes, image, IMAGE_SIZE, 0.0, 1.0)
    exact = processing.stability_score(processing.upscale_logits(planes, input_hw, HW, IMAGE_SIZE), 0.0, 1.0)
    relevant = (exact >= 0.9) & (outer >= amg.STABILITY_PREFILTER_MIN_PIXELS)
    assert relevant.sum() > 100
    assert np.max((exact - estimate)[relevant]) < amg.STABILITY_PREFILTER_MARGIN
    for threshold in (0.85, 0.9, 0.95):
        kept = amg.stability_prefilter(planes, image, IMAGE_SIZE, 0.0, 1.0, threshold)
        assert kept[exact >= threshold].all()
        margin, big_enough = 2 * amg.STABILITY_PREFILTER_MARGIN, outer >= amg.STABILITY_PREFILTER_MIN_PIXELS
        unstable = (exact < threshold - margin) & big_enough
        assert unstable.sum() > 20 and not kept[unstable].any(), "unstable masks must be pre-filtered"
