"""Request validation through the real servicer: every numeric field of Segment prompts (points x/y/label, box,
mask_input height/width/data, multimask) and of GenerateMasks (every parameter, point_grids), and the mask_encoding
enum, with NaN, +-inf, huge, negative, zero and valid values, on the embedded seed image (by id: no re-encoding),
an unknown id, image bytes, or no image. Property (:mod:`tests.fuzz.harness`): a status code in ALLOWED, the
gateway alive, its peak memory bounded."""

from __future__ import annotations

import collections

import grpc
from hypothesis import given

from samserve.api import pb
from tests.fuzz.harness import FuzzTarget, fuzz_settings, run_for
from tests.fuzz.strategies import generate_requests, segment_requests


def test_segment_prompt_fields(fuzz_target: FuzzTarget):
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @fuzz_settings(batch=25)
    @given(request=segment_requests(fuzz_target.image_id))
    def one(request: pb.SegmentRequest) -> None:
        seen[fuzz_target.send("Segment", request)] += 1

    with fuzz_target.memory_checked():
        run_for("segment_fields", one)
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen


def test_generate_masks_parameters(fuzz_target: FuzzTarget):
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @fuzz_settings(batch=25)
    @given(request=generate_requests(fuzz_target.image_id))
    def one(request: pb.GenerateMasksRequest) -> None:
        seen[fuzz_target.send("GenerateMasks", request)] += 1

    with fuzz_target.memory_checked():
        run_for("generate_fields", one)
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen
