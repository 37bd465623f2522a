"""The prompt cases the parity tests send to the official predictor and, as the client's :class:`PromptSpec`, to
the service."""

from __future__ import annotations

import numpy as np

from samserve.client.typed_client import PromptSpec


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


def prompt_spec(kwargs: dict) -> PromptSpec:
    """The same prompt as the client sends it (official-predictor keyword arguments -> :class:`PromptSpec`;
    ``mask_input`` h x w, without the official leading axis)."""
    points = kwargs.get("point_coords")
    mask_input, box = kwargs.get("mask_input"), kwargs.get("box")
    return PromptSpec(
        points=[(float(x), float(y)) for x, y in points] if points is not None else (),
        labels=[int(label) for label in kwargs["point_labels"]] if points is not None else (),
        box=None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        mask_input=None if mask_input is None else np.asarray(mask_input).reshape(mask_input.shape[-2:]),
        multimask_output=kwargs["multimask_output"],
    )
