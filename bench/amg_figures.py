"""The figures of bench/amg_cpu.py that are pure functions of its measurements (no torch, no Triton: the unit tier
tests them, tests/unit/test_amg_bench.py)."""

from __future__ import annotations

import statistics
from typing import Any

SPEEDUP_TARGET = 3.0
"""With the encoder excluded, GenerateMasks at least this many times faster than the official generator."""
PEAK_MEMORY_RATIO_TARGET = 1.0
"""Our peak memory (gateway + Triton) at most this fraction of the official process's."""
IOU_MIN = 0.95
"""A pair of masks (official, ours) matches at this IoU or more."""
NOT_APPLICABLE = "not applicable (0 masks on both sides)"


def spread(samples: list[float]) -> dict[str, Any]:
    """Seconds: median, min, max and the samples themselves (in the order taken)."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": list(samples)}


def parity(official_masks: int, our_masks: int, matched: int) -> dict[str, Any]:
    """The mask counts of both sides and ``matched`` (pairs at IoU >= :data:`IOU_MIN`) with ``parity``:

    * "measured", with ``count_ratio`` (ours / official) and ``matched_fraction`` (matched / official), when
      official keeps masks (both 0.0 when ours keeps none: a real disagreement);
    * a disagreement, with no ratio (there is none to 0), when only ours keeps masks;
    * :data:`NOT_APPLICABLE`, with no ratio at all, when neither side keeps a mask: 0 = 0 proves nothing.
    """
    counts = {"official_masks": official_masks, "our_masks": our_masks, f"matched_iou_{IOU_MIN}": matched}
    if official_masks == our_masks == 0:
        return {"parity": NOT_APPLICABLE, **counts}
    if official_masks == 0:
        return {"parity": f"disagreement: official keeps 0 masks, ours {our_masks}", **counts,
                "count_ratio": None, "matched_fraction": None}
    return {"parity": "measured", **counts, "count_ratio": our_masks / official_masks,
            "matched_fraction": matched / official_masks}


def targets_met(include_encoder: bool, speedup: float, peak_memory_ratio: float,
                parity_record: dict[str, Any]) -> dict[str, bool | str]:
    """Per target, met or not; "not applicable" where no mask survives on either side (the generators then skip
    the full-resolution work the case is meant to measure) and, for the speedup, where the encoder is in the
    timed call (the target is for the encoder excluded)."""
    if parity_record["parity"] == NOT_APPLICABLE:
        return {"speedup_excluding_encoder": NOT_APPLICABLE, "peak_memory_ratio": NOT_APPLICABLE}
    return {
        "speedup_excluding_encoder": "not applicable (encoder included)" if include_encoder
        else speedup >= SPEEDUP_TARGET,
        "peak_memory_ratio": peak_memory_ratio <= PEAK_MEMORY_RATIO_TARGET,
    }
