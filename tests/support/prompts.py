"""The prompt cases the parity tests send to the official predictor and to the service."""

from __future__ import annotations

import numpy as np


def prompt_for(case: str, height: int, width: int, multimask: bool) -> dict:
    """Official-predictor keyword arguments for each case (original-image pixels)."""
    w, h = width, height
    cases = {
        "point": dict(point_coords=np.array([[0.5 * w, 0.4 * h]]), point_labels=np.array([1])),
        "fg_bg": dict(point_coords=np.array([[0.3 * w, 0.3 * h], [0.7 * w, 0.6 * h]]), point_labels=np.array([1, 0])),
        "box": dict(box=np.array([0.2 * w, 0.25 * h, 0.8 * w, 0.75 * h])),
        "box_points": dict(
            point_coords=np.array([[0.5 * w, 0.5 * h], [0.25 * w, 0.3 * h]]),
            point_labels=np.array([1, 0]),
            box=np.array([0.1 * w, 0.1 * h, 0.9 * w, 0.85 * h]),
        ),
    }
    return dict(cases[case], multimask_output=multimask)
