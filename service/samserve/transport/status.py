"""THE place that maps errors to status codes (:data:`STATUS_CODES`), and the rich status details sent with them:
a ``google.rpc.BadRequest`` field violation when a request field is at fault, ``QuotaFailure`` and ``RetryInfo``
(what ran out, when to retry), and the request id as ``google.rpc.RequestInfo``. The gRPC interceptors
(:mod:`samserve.transport.interceptors`) apply it; the HTTP transport maps the resulting codes on."""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from samserve.core.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from samserve.transport.call_context import request_id

RETRY_AFTER_HEADER = "retry-after"
"""Trailing metadata of a RESOURCE_EXHAUSTED that may succeed later: seconds to wait, decimal (``0.250``)."""
STATUS_DETAILS_HEADER = "grpc-status-details-bin"
"""Trailing metadata key of the serialized ``google.rpc.Status`` (what grpcio-status and other stacks read)."""

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,  # asyncio.TimeoutError is TimeoutError
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,  # the process hit its memory limit (RLIMIT_DATA, ...)
    Internal: grpc.StatusCode.INTERNAL,
}
"""Error type -> status code; a subclass takes its nearest base's code."""
MESSAGES: dict[type[BaseException], str] = {
    TimeoutError: "deadline exceeded",
    MemoryError: "the gateway ran out of memory for this request; retry later, or send a smaller image or fewer "
                 "prompts",
}
"""What the client is told for the mapped errors that are not ours (ours carry their own message)."""

def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The status code :data:`STATUS_CODES` gives ``error`` (None: unmapped, i.e. an internal failure)."""
    for kind in type(error).__mro__:
        if kind in STATUS_CODES:
            return STATUS_CODES[kind]
    return None


def status_details(code: grpc.StatusCode, message: str, error: BaseException | None) -> status_pb2.Status:
    """The ``google.rpc.Status`` sent in the trailers: code, message, BadRequest (when a field is at fault),
    QuotaFailure and RetryInfo (what ran out, when to retry) and RequestInfo."""
    details: list[Any] = []
    field = getattr(error, "field", None)
    if field:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
        )
        details.append(bad_request)
    if isinstance(error, ResourceExhausted) and error.quota:
        violation = error_details_pb2.QuotaFailure.Violation(subject=error.quota, description=message)
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
    if isinstance(error, ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(math.ceil(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details.append(error_details_pb2.RequestInfo(request_id=request_id.get()))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)
