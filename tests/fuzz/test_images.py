"""Image decoding through the real servicer: arbitrary bytes, valid images of every accepted format (and GIF, which
is refused) in many pixel modes, with EXIF orientations and several frames, and the same with mutated headers (bit
flips, truncation, declared sizes from zero to decompression bombs), sent to Embed, Segment and GenerateMasks.
Property (:mod:`tests.fuzz.harness`): a status code in ALLOWED, the gateway alive, its peak memory bounded."""

from __future__ import annotations

import collections

import grpc
from hypothesis import given
from hypothesis import strategies as st

from samserve.api import pb
from tests.fuzz.harness import FuzzTarget, fuzz_settings, run_for
from tests.fuzz.strategies import image_bytes


def test_image_bytes_through_every_method(fuzz_target: FuzzTarget):
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()
    point = pb.Prompt(points=[pb.Point(x=0.5, y=0.5, label=pb.POINT_LABEL_FOREGROUND)])

    @fuzz_settings(batch=20)
    @given(data=image_bytes(), method=st.sampled_from(["Embed", "Segment", "GenerateMasks"]))
    def one(data: bytes, method: str) -> None:
        request = {
            "Embed": lambda: pb.EmbedRequest(image=data),
            "Segment": lambda: pb.SegmentRequest(image_bytes=data, prompts=[point]),
            "GenerateMasks": lambda: pb.GenerateMasksRequest(image_bytes=data, points_per_side=2),
        }[method]()
        seen[fuzz_target.send(method, request)] += 1

    with fuzz_target.memory_checked():
        run_for("images", one)
    # The generator reaches both sides: images that decode and embed, and bytes that are refused.
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen


def test_request_over_the_size_limit_is_resource_exhausted(fuzz_target: FuzzTarget):
    over = pb.EmbedRequest(image=bytes(33 << 20))  # max_request_bytes is 32 MiB
    assert fuzz_target.send("Embed", over) == grpc.StatusCode.RESOURCE_EXHAUSTED
