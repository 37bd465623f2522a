"""Request validation through the real servicer: every numeric field of Segment prompts (points x/y/label, box,
mask_input height/width/data, multimask) and of GenerateMasks (every parameter, point_grids), and the mask_encoding
enum, with NaN, +-inf, huge, negative, zero and valid values, on the embedded seed image (by id: no re-encoding),
an unknown id, image bytes, or no image. Property (:mod:`tests.fuzz.harness`): a status code in ALLOWED, the
gateway alive, its peak memory bounded."""

from __future__ import annotations

import collections
from typing import Any

import grpc
import pytest
from hypothesis import given

from tests.fuzz.harness import FuzzTarget, fuzz_settings, run_for
from tests.fuzz.strategies import generate_requests, segment_requests

TARGETS = {"segment_fields": ("Segment", segment_requests), "generate_fields": ("GenerateMasks", generate_requests)}
"""Budget share name -> (method, strategy of its requests given the embedded image's id)."""


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_numeric_field(fuzz_target: FuzzTarget, name: str):
    method, requests = TARGETS[name]
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @fuzz_settings(batch=25)
    @given(request=requests(fuzz_target.image_id))
    def one(request: Any) -> None:
        seen[fuzz_target.send(method, request)] += 1

    with fuzz_target.memory_checked():
        run_for(name, one)
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen
