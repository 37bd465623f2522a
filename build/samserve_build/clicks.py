"""Corrective clicks: where the next click of an interactive session goes, given the previous mask.

Shared by the training recipe (SAM's rule: uniform over the error region) and the evaluation (a deterministic rule:
the centre of the largest error region). Masks are H x W bool NumPy arrays; coordinates are (x, y) pixels of the
same grid.
"""

from __future__ import annotations

import cv2
import numpy as np

from samserve.core import model_spec
from samserve_build import scenes


def error_point(
    predicted: np.ndarray, target: np.ndarray, rng: np.random.Generator | None
) -> tuple[float, float, float]:
    """(x, y, label) of the next corrective click. With ``rng``: uniform over the error region (SAM's training);
    without: the pixel farthest from the boundary of the largest connected error region (the evaluation's rule).
    The label is foreground where the object was missed and background where the mask spilled over."""
    error = predicted != target
    if not error.any():
        ys, xs = np.nonzero(target)
        pick = 0 if rng is None else int(rng.integers(len(ys)))
        return float(xs[pick]), float(ys[pick]), float(model_spec.LABEL_FOREGROUND)
    if rng is not None:
        ys, xs = np.nonzero(error)
        pick = int(rng.integers(len(ys)))
        y, x = int(ys[pick]), int(xs[pick])
    else:
        count, components = cv2.connectedComponents(error.astype(np.uint8), connectivity=8)
        sizes = np.bincount(components.ravel(), minlength=count)
        sizes[0] = 0
        largest = components == int(np.argmax(sizes))
        x, y = (int(v) for v in scenes.farthest_interior_point(largest))
    return float(x), float(y), float(model_spec.LABEL_FOREGROUND if target[y, x] else model_spec.LABEL_BACKGROUND)
