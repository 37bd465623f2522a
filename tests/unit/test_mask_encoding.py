"""COCO RLE of the API against pycocotools' own ``mask.encode``: byte-for-byte the same counts, on both of
:func:`mask_encoding.coco_rle`'s paths (numpy runs for smooth masks, pycocotools for noisy ones)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from samserve.vision import mask_encoding

SIZES = [(1, 1), (1, 7), (7, 1), (3, 5), (17, 33), (480, 640), (768, 1024), (5, 1500), (1500, 3)]


def varied_masks(height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Empty, full, single pixels (corners, centre), stripes both ways, a disc, sparse and dense noise."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((height, width), bool), np.ones((height, width), bool)]
    for y, x in [(0, 0), (height - 1, width - 1), (height // 2, width // 2), (0, width - 1), (height - 1, 0)]:
        single = np.zeros((height, width), bool)
        single[y, x] = True
        masks += [single, ~single]
    for step in (2, 3):
        rows, cols = np.zeros((height, width), bool), np.zeros((height, width), bool)
        rows[::step], cols[:, ::step] = True, True
        masks += [rows, cols]
    yy, xx = np.mgrid[:height, :width]
    masks.append((yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 3) ** 2)
    masks += [rng.random((height, width)) < 0.001, rng.random((height, width)) < 0.5]
    return masks


def pycocotools_rle(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask[:, :, None]).view(np.uint8))[0]


@pytest.mark.parametrize("path", ["auto", "numpy", "pycocotools"])
@pytest.mark.parametrize("hw", SIZES)
def test_coco_rle_equals_pycocotools(hw, path, monkeypatch):
    if path != "auto":  # every mask through one path: changes per pixel are always < 2 and never < 0
        monkeypatch.setattr(mask_encoding, "SPARSE_CHANGES", 2.0 if path == "numpy" else 0.0)
    masks = varied_masks(*hw)
    for mask in masks:
        expected = pycocotools_rle(mask)
        for stored in (mask, np.asfortranarray(mask)):  # row-major (copied) and column-major (a view)
            got = mask_encoding.coco_rle(stored[None])[0]
            assert got == expected
            assert type(got["counts"]) is bytes and [type(v) for v in got["size"]] == [int, int]
    stack = np.stack(masks)
    assert mask_encoding.coco_rle(stack) == coco_mask.encode(np.asfortranarray(stack.transpose(1, 2, 0)))


def test_coco_rle_large_counts():
    """Counts that need several characters (and negative deltas) in the compressed string."""
    mask = np.zeros((3000, 2500), bool)
    mask[1:, :] = True
    mask[-1, -1] = False
    assert mask_encoding.coco_rle(mask[None])[0] == pycocotools_rle(mask)
    lone = np.zeros((3000, 2500), bool)
    lone[-1, -1] = True
    assert mask_encoding.coco_rle(lone[None])[0] == pycocotools_rle(lone)


def test_run_lengths_start_with_zeros():
    np.testing.assert_array_equal(mask_encoding.run_lengths(np.array([1, 1, 0, 1], np.uint8)), [0, 2, 1, 1])
    np.testing.assert_array_equal(mask_encoding.run_lengths(np.array([0, 0, 0], np.uint8)), [3])
    np.testing.assert_array_equal(mask_encoding.run_lengths(np.zeros(0, np.uint8)), [0])


def test_few_changes_estimate():
    smooth = np.zeros((1024, 768), np.uint8)
    smooth[:, 300:500] = 1
    assert mask_encoding.few_changes(smooth)
    noisy = (np.random.default_rng(1).random((1024, 768)) < 0.5).astype(np.uint8)
    assert not mask_encoding.few_changes(noisy)


def test_decode_round_trip():
    for mask in varied_masks(37, 53, seed=2):
        rle = mask_encoding.coco_rle(mask[None])[0]
        np.testing.assert_array_equal(mask_encoding.decode_rle(rle["size"], rle["counts"]), mask)
