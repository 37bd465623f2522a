"""The one table from errors to status codes, and the rich details built from an error."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from samserve.core.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SamServeError,
    Unavailable,
)
from samserve.transport.call_context import request_id
from samserve.transport.status import MESSAGES, STATUS_CODES, status_code, status_details
from samserve.vision.amg import InvalidParameters


@pytest.mark.parametrize("error, code", [
    (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidParameters("points_per_side must lie in [1, 128], got 0"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Internal("x"), grpc.StatusCode.INTERNAL),
])
def test_every_domain_error_has_its_code(error, code):
    assert status_code(error) is code


def test_every_mapped_foreign_error_has_a_message():
    foreign = {kind for kind in STATUS_CODES if not issubclass(kind, SamServeError)}
    assert foreign == set(MESSAGES)


@pytest.mark.parametrize("error", [SamServeError("x"), ValueError("x"), KeyError("x")])
def test_unmapped_errors_have_no_code(error):
    assert status_code(error) is None  # the interceptor answers INTERNAL with a generic message


def test_details_name_the_field_at_fault_and_the_request():
    token = request_id.set("abc123")
    try:
        error = InvalidParameters("crop_n_layers must lie in [0, 3], got 9")
        status = status_details(grpc.StatusCode.INVALID_ARGUMENT, str(error), error)
    finally:
        request_id.reset(token)
    bad_request, info = error_details_pb2.BadRequest(), error_details_pb2.RequestInfo()
    assert status.details[0].Unpack(bad_request) and status.details[1].Unpack(info)
    assert bad_request.field_violations[0].field == "crop_n_layers"
    assert bad_request.field_violations[0].description == str(error)
    assert info.request_id == "abc123"
    plain = status_details(grpc.StatusCode.NOT_FOUND, "gone", NotFound("gone"))
    assert len(plain.details) == 1  # no field: RequestInfo only
