"""Malformed protos through the real gateway: arbitrary bytes as the serialized request of each method, and valid
requests' serializations truncated and mutated, sent as raw bytes on the wire. Property (:mod:`tests.fuzz.harness`):
a status code in ALLOWED (a message that does not parse is INVALID_ARGUMENT, never gRPC's own UNKNOWN), the gateway
alive, its peak memory bounded."""

from __future__ import annotations

import grpc
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import METHODS, FuzzTarget, fuzz_settings, run_for
from tests.fuzz.strategies import mutated, valid_requests


def test_arbitrary_bytes_as_requests(fuzz_target: FuzzTarget):
    @fuzz_settings(batch=50)
    @given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=512))
    def one(method: str, payload: bytes) -> None:
        fuzz_target.call(method, payload)

    with fuzz_target.memory_checked():
        run_for("raw_messages", one)


def test_mutated_valid_requests(fuzz_target: FuzzTarget):
    bases = valid_requests(fuzz_target.image_id)
    for method, payloads in bases.items():  # the unmutated bases are valid: the mutations start from OK
        for payload in payloads:
            assert fuzz_target.call(method, payload) == grpc.StatusCode.OK, method

    @fuzz_settings(batch=30)
    @given(data=st.data(), method=st.sampled_from(sorted(bases)))
    def one(data: st.DataObject, method: str) -> None:
        fuzz_target.call(method, data.draw(mutated(st.sampled_from(bases[method]))))

    with fuzz_target.memory_checked():
        run_for("mutated_messages", one)
