"""The figures bench/amg_cpu.py reports: a comparison of 0 masks with 0 masks is "not applicable", never a score."""

from __future__ import annotations

import pytest

from bench.amg_figures import NOT_APPLICABLE, parity, spread, targets_met


def test_zero_masks_on_both_sides_is_not_applicable_and_carries_no_score() -> None:
    record = parity(0, 0, 0)
    assert record["parity"] == NOT_APPLICABLE
    assert record["official_masks"] == record["our_masks"] == 0
    assert "count_ratio" not in record and "matched_fraction" not in record
    assert targets_met(False, speedup=10.0, peak_memory_ratio=0.5, parity_record=record) == {
        "speedup_excluding_encoder": NOT_APPLICABLE, "peak_memory_ratio": NOT_APPLICABLE}


def test_masks_on_one_side_only_are_a_disagreement() -> None:
    only_ours = parity(0, 4, 0)
    assert only_ours["parity"].startswith("disagreement") and only_ours["count_ratio"] is None
    only_official = parity(5, 0, 0)
    assert only_official["parity"] == "measured"
    assert only_official["count_ratio"] == only_official["matched_fraction"] == 0.0


def test_ratios_are_to_the_official_count() -> None:
    record = parity(8, 10, 6)
    assert record["parity"] == "measured" and record["matched_iou_0.95"] == 6
    assert record["count_ratio"] == pytest.approx(1.25) and record["matched_fraction"] == pytest.approx(0.75)


@pytest.mark.parametrize(("include_encoder", "speedup", "ratio", "expected"), [
    (False, 3.0, 1.0, {"speedup_excluding_encoder": True, "peak_memory_ratio": True}),
    (False, 2.9, 1.1, {"speedup_excluding_encoder": False, "peak_memory_ratio": False}),
    (True, 9.0, 0.5, {"speedup_excluding_encoder": "not applicable (encoder included)", "peak_memory_ratio": True}),
])
def test_targets_where_masks_survive(include_encoder: bool, speedup: float, ratio: float, expected: dict) -> None:
    assert targets_met(include_encoder, speedup, ratio, parity(3, 3, 3)) == expected


def test_spread_keeps_the_samples_in_order() -> None:
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median_s": 2.5, "min_s": 1.0, "max_s": 10.0,
                                             "samples_s": [3.0, 1.0, 2.0, 10.0]}

