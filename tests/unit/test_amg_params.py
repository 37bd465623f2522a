"""GenerateMasks parameters: every one outside its domain is rejected, naming it (also as the field at fault)."""

from __future__ import annotations

import numpy as np
import pytest

from samserve.vision import amg


@pytest.mark.parametrize("field, kwargs", [
    ("points_per_side", dict(points_per_side=0)),
    ("pred_iou_thresh", dict(pred_iou_thresh=1.5)),
    ("stability_score_thresh", dict(stability_score_thresh=-0.1)),
    ("box_nms_thresh", dict(box_nms_thresh=float("nan"))),
    ("crop_n_layers", dict(crop_n_layers=-1)),
    ("crop_n_layers", dict(crop_n_layers=amg.MAX_CROP_LAYERS + 1)),
    ("points_per_batch", dict(points_per_batch=0)),
    ("point_grids[0]", dict(points_per_side=None, point_grids=(np.array([[0.5, 1.2]]),))),
    ("points_per_side", dict(point_grids=(np.array([[0.5, 0.5]]),))),  # both set: exactly one of them
])
def test_invalid_parameters_are_named(field, kwargs):
    with pytest.raises(amg.InvalidParameters) as caught:
        amg.AmgParams(**kwargs).validate(max_points_per_layer=4096, max_points_per_batch=256)
    assert caught.value.field == field and str(caught.value).startswith(field)


def test_the_official_defaults_are_valid():
    amg.AmgParams().validate(4096, 256)
