"""Image decoding through the real servicer: arbitrary bytes, valid images of every accepted format (and GIF, which
is refused) in many pixel modes, with EXIF orientations and several frames, and the same with mutated headers (bit
flips, truncation, declared sizes from zero to decompression bombs), sent to Embed, Segment and GenerateMasks.
Property (:mod:`tests.fuzz.harness`): a status code in ALLOWED, the gateway alive, its peak memory bounded."""

from __future__ import annotations

import collections
import io

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from samserve.core.api import pb
from samserve.core.settings import GatewaySettings
from tests.fuzz.harness import PEAK_RSS_BOUND_BYTES, FuzzTarget, fuzz_settings, run_for
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


MAX_PIXELS = GatewaySettings().max_image_pixels  # the gateway under fuzz runs the default


@pytest.mark.parametrize("width, expected", [(MAX_PIXELS // 8000, grpc.StatusCode.OK),
                                             (MAX_PIXELS // 8000 + 1, grpc.StatusCode.INVALID_ARGUMENT)])
def test_largest_allowed_image_decodes_within_the_memory_bound(fuzz_target: FuzzTarget, width, expected):
    """The worst image a client may send (max_image_pixels of RGBA, every pixel decoded) embeds under the bound;
    one column more is refused from the header. (A small PNG: the pixels are one color.)"""
    buffer = io.BytesIO()
    Image.new("RGBA", (width, 8000), (200, 30, 60, 128)).save(buffer, "PNG")
    assert fuzz_target.send("Embed", pb.EmbedRequest(image=buffer.getvalue())) == expected
    print(f"{width}x8000 RGBA PNG ({len(buffer.getvalue())} bytes): peak RSS during the call "
          f"{fuzz_target.last_peak_bytes / 2**20:.0f} MiB (bound {PEAK_RSS_BOUND_BYTES / 2**20:.0f} MiB)")
