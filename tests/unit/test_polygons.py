"""Masks to polygons (samserve.vision.polygons): rings, roles, dropped parts, the IoU of the round trip."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from bench.polygon_figures import noisy_mask
from samserve.core.errors import InvalidArgument
from samserve.vision import polygons
from samserve_build import scenes

NOISY_SEEDS = range(8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _disk(height: int, width: int, cx: int, cy: int, radius: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    cv2.circle(canvas, (cx, cy), radius, (1,), -1)
    return canvas.astype(bool)


def test_rectangle_is_four_corners_at_pixel_centres_and_round_trips() -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:30] = True    # rows 10-19 (y), columns 5-29 (x)
    result = polygons.mask_to_polygons(mask)
    assert len(result.rings) == 1 and result.dropped_parts == 0
    ring = result.rings[0]
    assert ring.role == "exterior" and ring.parent is None
    xs, ys = ring.points[0::2], ring.points[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (5.5, 29.5, 10.5, 19.5)    # centres of the corner pixels
    assert len(ring.points) == 8
    assert result.iou == 1.0
    assert np.array_equal(polygons.polygons_to_mask(result, 40, 50), mask)
    assert polygons.coco_segmentation(result) == [ring.points]


def test_disk_round_trips_and_tolerance_trades_vertices_for_iou() -> None:
    mask = _disk(120, 140, 70, 60, 40)
    exact, default, coarse = (polygons.mask_to_polygons(mask, tolerance, min_iou=0) for tolerance in (0, 1, 4))
    assert exact.iou == 1.0
    assert np.array_equal(polygons.polygons_to_mask(exact, 120, 140), mask)
    assert default.iou >= 0.98 and coarse.iou < default.iou
    assert exact.vertex_count() > default.vertex_count() > coarse.vertex_count() >= 3
    # the reported IoU is that of the published rasteriser
    assert default.iou == pytest.approx(_iou(polygons.polygons_to_mask(default, 120, 140), mask))
    centre = default.rings[0].vertices().mean(axis=0)
    assert centre == pytest.approx((70.5, 60.5), abs=0.5)


def test_annulus_is_one_exterior_with_one_hole() -> None:
    mask = _disk(100, 100, 50, 50, 30) & ~_disk(100, 100, 50, 50, 12)
    for tolerance in (0.0, 1.0):
        result = polygons.mask_to_polygons(mask, tolerance)
        assert [(ring.role, ring.parent) for ring in result.rings] == [("exterior", None), ("interior", 0)]
        assert result.dropped_parts == 0
        assert result.iou >= (1.0 if tolerance == 0 else 0.97)
        hole = result.rings[1].vertices()
        assert np.abs(np.hypot(*(hole - 50.5).T) - 12).max() <= 2    # the hole ring runs around the hole
        assert len(polygons.coco_segmentation(result)) == 1
    redrawn = polygons.polygons_to_mask(polygons.mask_to_polygons(mask, 0), 100, 100)
    assert not redrawn[50, 50] and redrawn[50, 50 + 20]


def test_island_in_a_hole_is_a_part_of_its_own() -> None:
    mask = (_disk(100, 100, 50, 50, 40) & ~_disk(100, 100, 50, 50, 25)) | _disk(100, 100, 50, 50, 10)
    result = polygons.mask_to_polygons(mask, 0)
    assert sorted(ring.role for ring in result.rings) == ["exterior", "exterior", "interior"]
    assert result.iou == 1.0
    # rings in any order redraw the same mask
    reordered = polygons.PolygonSet(result.rings[::-1], 0, 1.0, 100, 100)
    remapped = [
        polygons.Ring(ring.points, ring.role, None if ring.parent is None else len(result.rings) - 1 - ring.parent)
        for ring in reordered.rings
    ]
    assert np.array_equal(polygons.polygons_to_mask(polygons.PolygonSet(remapped, 0, 1.0, 100, 100), 100, 100), mask)


def test_two_blobs_are_two_exteriors() -> None:
    mask = _disk(80, 160, 40, 40, 20) | _disk(80, 160, 120, 40, 15)
    result = polygons.mask_to_polygons(mask)
    assert [ring.role for ring in result.rings] == ["exterior", "exterior"]
    centres = sorted(ring.vertices().mean(axis=0)[0] for ring in result.rings)
    assert centres == pytest.approx([40.5, 120.5], abs=1)
    assert len(polygons.coco_segmentation(result)) == 2


def test_specks_and_pinholes_under_the_minimum_area_are_dropped_and_counted() -> None:
    mask = _disk(60, 60, 30, 30, 15)
    mask[2, 2] = True                        # a 1-pixel speck
    mask[50:52, 50] = True                   # a 2-pixel speck
    mask[30, 30] = False                     # a 1-pixel hole
    mask[5:7, 50:52] = True                  # 2 x 2: 4 pixels, kept
    result = polygons.mask_to_polygons(mask)
    assert result.dropped_parts == 3
    assert [ring.role for ring in result.rings] == ["exterior", "exterior"]
    assert result.iou == pytest.approx(_iou(polygons.polygons_to_mask(result, 60, 60), mask))
    # with no minimum area the pinhole stays; the specks still go: their outlines have under 3 vertices
    keep_all = polygons.mask_to_polygons(mask, 0, min_area_px=0)
    assert keep_all.dropped_parts == 2
    assert sorted(ring.role for ring in keep_all.rings) == ["exterior", "exterior", "interior"]
    expected = mask.copy()
    expected[2, 2] = expected[50, 50] = expected[51, 50] = False
    assert np.array_equal(polygons.polygons_to_mask(keep_all, 60, 60), expected)
    only_big = polygons.mask_to_polygons(mask, 0, min_area_px=math.pi * 15 ** 2 * 0.9)
    assert only_big.dropped_parts == 4 and len(only_big.rings) == 1


def test_thin_stroke_survives_simplification() -> None:
    mask = np.zeros((20, 40), bool)
    mask[10, 5:35] = True
    result = polygons.mask_to_polygons(mask, 2.0)
    assert len(result.rings) == 1 and result.iou == 1.0


def test_empty_mask_and_fully_dropped_mask() -> None:
    empty = polygons.mask_to_polygons(np.zeros((30, 40), np.uint8))
    assert empty.rings == [] and empty.dropped_parts == 0 and empty.iou == 1.0
    assert polygons.coco_segmentation(empty) == []
    assert not polygons.polygons_to_mask(empty, 30, 40).any()
    speck = np.zeros((30, 40), np.uint8)
    speck[3, 4] = 255
    gone = polygons.mask_to_polygons(speck)
    assert gone.rings == [] and gone.dropped_parts == 1 and gone.iou == 0.0


@pytest.mark.parametrize("seed", NOISY_SEEDS)
def test_noisy_masks_keep_their_shape(seed: int) -> None:
    mask = noisy_mask(seed)
    exact, default, coarse = (polygons.mask_to_polygons(mask, tolerance, min_iou=0) for tolerance in (0, 1, 3))
    assert exact.dropped_parts > 0                             # the speckle
    assert default.iou >= 0.98
    assert exact.iou >= default.iou > coarse.iou
    assert exact.vertex_count() > default.vertex_count() > coarse.vertex_count()
    assert any(ring.role == "interior" for ring in exact.rings)
    for result in (exact, default, coarse):
        assert result.iou == pytest.approx(_iou(polygons.polygons_to_mask(result, *mask.shape), mask))
        for index, ring in enumerate(result.rings):
            assert len(ring.points) >= 6 and len(ring.points) % 2 == 0
            if ring.role == "interior":
                assert ring.parent is not None and ring.parent < index
                assert result.rings[ring.parent].role == "exterior"
            else:
                assert ring.parent is None


def test_the_half_pixel_shift_is_what_pycocotools_agrees_with_best() -> None:
    coco_mask = pytest.importorskip("pycocotools.mask")
    mask = _disk(200, 240, 120, 100, 60)
    result = polygons.mask_to_polygons(mask, 0)

    def coco_iou(shift: float) -> float:
        lists = [[value - polygons.PIXEL_CENTRE + shift for value in points]
                 for points in polygons.coco_segmentation(result)]
        return _iou(coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(lists, 200, 240))).astype(bool), mask)

    assert coco_iou(0.5) > coco_iou(0.0)


def test_scene_masks_round_trip() -> None:
    """The shipped model's scenes (their ground-truth masks): exact at tolerance 0; at the default tolerance the
    answer keeps IoU >= MIN_IOU, simplifying less where 1 px would not (small and thin objects), and it is still
    far simpler than the traced outline."""
    checked = simplified_less = 0
    traced_vertices = default_vertices = 0
    for seed in range(12):
        for instance in scenes.generate_scene(scenes.EVAL_SEED_OFFSET + seed).instances:
            for mask in (instance.mask, instance.whole):
                exact, default = polygons.mask_to_polygons(mask, 0), polygons.mask_to_polygons(mask)
                plain = polygons.mask_to_polygons(mask, min_iou=0)
                assert exact.iou >= 0.999
                assert default.iou >= polygons.MIN_IOU
                assert default.iou == pytest.approx(_iou(polygons.polygons_to_mask(default, *mask.shape), mask))
                if plain.iou < polygons.MIN_IOU:
                    assert default.tolerance_px < polygons.DEFAULT_TOLERANCE_PX
                    simplified_less += 1
                else:
                    assert default.tolerance_px == polygons.DEFAULT_TOLERANCE_PX and default.iou == plain.iou
                # at 1 px a ring can lose up to about a pixel along its outline, no more
                outline = sum(cv2.arcLength(ring.vertices().astype(np.float32), True) for ring in plain.rings)
                assert (1 - plain.iou) * mask.sum() <= 0.5 * outline
                traced_vertices += exact.vertex_count()
                default_vertices += default.vertex_count()
                checked += 1
    assert checked > 20
    assert 0 < simplified_less < checked / 2  # the fallback is taken, and only for some masks
    assert default_vertices < traced_vertices / 3


def test_a_coarse_tolerance_is_refined_until_the_iou_holds() -> None:
    mask = _disk(120, 140, 70, 60, 12)  # small: a coarse tolerance cuts off much of it
    plain = polygons.mask_to_polygons(mask, 4, min_iou=0)
    kept = polygons.mask_to_polygons(mask, 4)
    assert plain.iou < polygons.MIN_IOU <= kept.iou
    assert kept.tolerance_px in (2.0, 1.0, 0.5, 0.0) and plain.tolerance_px == 4.0
    assert kept.vertex_count() > plain.vertex_count()


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), -float("inf"), polygons.MAX_TOLERANCE_PX + 1,
                                   "abc", None, True])
def test_bad_tolerances_are_invalid_arguments_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        polygons.validate_tolerance(value)  # type: ignore[arg-type]
    assert raised.value.field == polygons.TOLERANCE_FIELD == "polygon_tolerance_px"
    with pytest.raises(InvalidArgument):
        polygons.mask_to_polygons(np.ones((4, 4), bool), value)  # type: ignore[arg-type]


def test_good_tolerances_pass() -> None:
    assert polygons.validate_tolerance(0) == 0.0
    assert polygons.validate_tolerance(2) == 2.0
    assert polygons.validate_tolerance(polygons.MAX_TOLERANCE_PX) == polygons.MAX_TOLERANCE_PX


def test_a_mask_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError):
        polygons.mask_to_polygons(np.zeros((2, 3, 4), bool))


def test_the_polygon_benchmarks_figures() -> None:
    """bench/polygons_cpu.py's summary: the floor is met only when every mask is at or above it."""
    from bench.polygon_figures import MaskRecord, figures

    records = [MaskRecord(0.99, 0.98, 1.0, 10, 40, 0, 0.001), MaskRecord(0.985, 0.985, 0.5, 20, 60, 2, 0.003)]
    summary = figures(records, 1.0, 0.98)
    assert summary["masks"] == 2 and summary["iou"]["min"] == 0.985 and summary["iou_floor_met"]
    assert summary["simplified_under_default_tolerance"] == 1 and summary["dropped_parts"] == 2
    assert summary["vertices_over_traced"] == 30 / 100 and summary["ms_per_mask_median"] == pytest.approx(2.0)
    assert not figures([*records, MaskRecord(0.97, 0.97, 0.0, 5, 5, 0, 0.001)], 1.0, 0.98)["iou_floor_met"]


def test_specks_that_carry_too_much_of_a_fragmented_mask_are_kept() -> None:
    """Parts under the minimum area are dropped while the IoU holds; where they carry more than the floor allows
    (a small, fragmented mask), they are kept, except those the trace cannot hold (under 3 vertices)."""
    def with_specks(side: int) -> np.ndarray:
        mask = np.zeros((60, 60), bool)
        mask[5:5 + side, 5:5 + side] = True
        for x in (40, 46, 52):  # three 3-pixel L shapes, under the 4-pixel minimum
            mask[40, x] = mask[41, x] = mask[40, x + 1] = True
        mask[55, 55] = True  # one pixel: no ring can hold it
        return mask

    fragmented = with_specks(10)
    kept = polygons.mask_to_polygons(fragmented)
    assert kept.iou >= polygons.MIN_IOU and kept.dropped_parts == 1 and len(kept.rings) == 4
    assert polygons.mask_to_polygons(fragmented, min_iou=0).dropped_parts == 4  # what the floor made it keep
    solid = polygons.mask_to_polygons(with_specks(30))
    assert solid.iou >= polygons.MIN_IOU and solid.dropped_parts == 4 and len(solid.rings) == 1
