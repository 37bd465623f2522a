"""HTTP requests into gRPC calls and gRPC answers into HTTP responses (:class:`Transcoder`); this module only maps
representations, every rule is the gRPC server's:

* the request: the JSON body (``body: "*"``), path parameters (``{image_id}``) and query parameters (scalar fields)
  into the request message; an image may also come as the raw body (``image/*``, ``application/octet-stream``) or
  as multipart form data (part ``image``, plus optional part ``request`` with the other fields as JSON), into the
  request's one top-level ``bytes`` field;
* the answer: JSON (lowerCamelCase names, fields with default values included), or the raw bytes of a
  ``google.api.HttpBody``;
* errors: the gRPC status to HTTP by :data:`HTTP_STATUS` (Google's mapping), the body the ``google.rpc.Status``
  as JSON (code, message, details), ``Retry-After`` from the ``retry-after`` trailer.

Headers in: ``Authorization`` and ``X-Request-Id`` (forwarded as metadata), ``X-Timeout-S`` (the call's deadline,
seconds). Headers out: ``X-Request-Id``. A client that disconnects cancels its call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import descriptor, json_format, message
from google.rpc import error_details_pb2, status_pb2  # noqa: F401 - error_details_pb2: details' types for JSON
from starlette.requests import Request
from starlette.responses import Response

from samserve.core import metrics
from samserve.core.api import SERVICE_NAME
from samserve.transport.call_context import REQUEST_ID_HEADER
from samserve.transport.http.routes import HttpRoute
from samserve.transport.status import RETRY_AFTER_HEADER, STATUS_DETAILS_HEADER

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""gRPC status -> HTTP status: Google's mapping (``google/rpc/code.proto``), as grpc-gateway and Envoy use it."""

CACHE_CONTROL: dict[str, str] = {"GetDecoder": "public, max-age=31536000, immutable"}
"""RPC -> ``Cache-Control`` of its successful answers (its route names the weights digest: never changes)."""

TIMEOUT_HEADER = "x-timeout-s"
FORWARDED_HEADERS = ("authorization", REQUEST_ID_HEADER)
"""HTTP headers passed to the gRPC call as metadata."""
RAW_IMAGE_TYPES = ("application/octet-stream",)
"""Content types (besides ``image/*``) whose body is the image itself."""
JSON_TYPES = ("application/json", "")
BASE64_SLACK = 1 << 20
"""JSON carries bytes as base64 (4 characters per 3 bytes): the body limit is the message limit x 4/3 + this."""


class HttpError(Exception):
    """A request this transport cannot turn into a message (bad JSON, an unknown field, a too-large body): the
    same status body as a gRPC error, made here because the request never becomes a call."""

    def __init__(self, code: grpc.StatusCode, message_text: str, http_status: int | None = None) -> None:
        super().__init__(message_text)
        self.code = code
        self.http_status = http_status or HTTP_STATUS[code]


def _query_value(field: descriptor.FieldDescriptor, text: str) -> Any:
    """A query-string value as the JSON value protobuf's JSON parser takes for ``field``."""
    kind = field.cpp_type
    if kind in (descriptor.FieldDescriptor.CPPTYPE_INT32, descriptor.FieldDescriptor.CPPTYPE_UINT32):
        return int(text)
    if kind in (descriptor.FieldDescriptor.CPPTYPE_FLOAT, descriptor.FieldDescriptor.CPPTYPE_DOUBLE):
        return float(text)
    if kind == descriptor.FieldDescriptor.CPPTYPE_BOOL:
        return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
    return text  # strings, enums (by name), 64-bit integers and bytes (base64) are strings in JSON too


def _fields_by_name(message_type: descriptor.Descriptor) -> dict[str, descriptor.FieldDescriptor]:
    return {name: f for f in message_type.fields for name in (f.name, f.json_name)}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body of {declared} bytes is over the limit of "
                        f"{limit} (SAMSERVE_MAX_REQUEST_BYTES, x 4/3 for base64 in JSON)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body over the limit of {limit} bytes "
                            "(SAMSERVE_MAX_REQUEST_BYTES, x 4/3 for base64 in JSON)")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(text: bytes | str, target: message.Message) -> None:
    try:
        json_format.Parse(text, target)
    except (json_format.ParseError, UnicodeDecodeError) as error:
        raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {target.DESCRIPTOR.name} in "
                        f"JSON: {error}") from None


async def build_request(route: HttpRoute, request: Request, body_limit: int) -> message.Message:
    """The request message of an HTTP request to ``route`` (:class:`HttpError` when it cannot be made)."""
    built = route.request_type()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image_field = route.image_field
    if route.body == "*":
        if content_type == "multipart/form-data":
            await _read_multipart(request, built, image_field, body_limit)
        else:
            body = await _read_body(request, body_limit)
            if content_type.startswith("image/") or content_type in RAW_IMAGE_TYPES:
                if image_field is None:
                    raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"{route.method.name} takes no image body")
                setattr(built, image_field.name, body)
            elif content_type in JSON_TYPES:
                if body.strip():
                    _parse_json(body, built)
            else:
                raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported content type {content_type!r}: send "
                                "application/json, an image (image/*, application/octet-stream) or "
                                "multipart/form-data", http_status=415)
    fields = _fields_by_name(route.method.input_type)
    query: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        field = fields.get(name)
        if field is None or field.cpp_type == descriptor.FieldDescriptor.CPPTYPE_MESSAGE:
            raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown query parameter {name!r} (scalar fields of "
                            f"{route.method.input_type.name} only)")
        try:
            parsed = _query_value(field, value)
        except (ValueError, KeyError):
            raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"query parameter {name}={value!r} is not a valid "
                            f"{field.name}") from None
        if field.is_repeated:
            query.setdefault(field.name, []).append(parsed)
        else:
            query[field.name] = parsed
    if query:
        partial = route.request_type()
        _parse_json(json.dumps(query), partial)
        built.MergeFrom(partial)
    for name in route.path_fields:
        setattr(built, name, request.path_params[name])
    return built


async def _read_multipart(
    request: Request, built: message.Message, image_field: descriptor.FieldDescriptor | None, body_limit: int
) -> None:
    """Part ``request``: the message's other fields as JSON; part ``image``: the image file."""
    try:
        async with request.form(max_files=1, max_fields=1, max_part_size=body_limit) as form:
            if "request" in form:
                text = form["request"]
                _parse_json(text if isinstance(text, str) else await text.read(), built)
            if "image" in form:
                if image_field is None:
                    raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, "this route takes no image")
                part = form["image"]
                data = part.encode() if isinstance(part, str) else await part.read()
                if len(data) > body_limit:
                    raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"image part over the limit of {body_limit}"
                                    " bytes (SAMSERVE_MAX_REQUEST_BYTES)")
                setattr(built, image_field.name, data)
    except HttpError:
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart's errors: a malformed form is the client's
        raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed multipart form: {error}") from None


def forwarded_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata of an HTTP request's (or WebSocket handshake's) headers: :data:`FORWARDED_HEADERS`."""
    return tuple((name, headers[name]) for name in FORWARDED_HEADERS if name in headers)


def request_timeout(headers: Mapping[str, str]) -> float | None:
    """The call's deadline in seconds from :data:`TIMEOUT_HEADER` (None: none); INVALID_ARGUMENT when malformed."""
    text = headers.get(TIMEOUT_HEADER)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, f"{TIMEOUT_HEADER} must be a positive number of seconds")
    return value


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def message_to_json(answer: message.Message) -> dict[str, Any]:
    """An answer in protobuf's JSON mapping: lowerCamelCase names, fields with default values included."""
    return json_format.MessageToDict(answer, always_print_fields_with_no_presence=True)


def error_response(code: grpc.StatusCode, text: str, trailers: Any = (), request_id: str | None = None,
                   http_status: int | None = None) -> Response:
    """The HTTP twin of a gRPC error: Google's status mapping, the ``google.rpc.Status`` as JSON."""
    trailing = dict(trailers or ())
    headers = {}
    request_id = trailing.get(REQUEST_ID_HEADER, request_id)
    if request_id:
        headers[REQUEST_ID_HEADER] = str(request_id)
    retry_after = trailing.get(RETRY_AFTER_HEADER)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(float(retry_after))))
    return _json(status_json(code, text, trailers), http_status or HTTP_STATUS.get(code, 500), headers)


def status_json(code: grpc.StatusCode, text: str, trailers: Any = ()) -> dict[str, Any]:
    """The ``google.rpc.Status`` of a gRPC error as JSON: the one its trailers carry, else code and message."""
    details = dict(trailers or ()).get(STATUS_DETAILS_HEADER)
    status = (status_pb2.Status.FromString(details) if isinstance(details, bytes)
              else status_pb2.Status(code=code.value[0], message=text))
    return json_format.MessageToDict(status, always_print_fields_with_no_presence=True)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by then: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Transcoder:
    """HTTP requests -> gRPC calls on ``channel`` (the gateway's private socket) -> HTTP answers."""

    def __init__(self, channel: grpc.aio.Channel, max_request_bytes: int) -> None:
        self.channel = channel
        self.body_limit = max_request_bytes * 4 // 3 + BASE64_SLACK

    def endpoint(self, route: HttpRoute) -> Callable[[Request], Any]:
        call = self.channel.unary_unary(
            f"/{SERVICE_NAME}/{route.method.name}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=route.response_type.FromString,
        )

        async def handle(request: Request) -> Response:
            try:
                built = await build_request(route, request, self.body_limit)
                timeout = request_timeout(request.headers)
            except HttpError as error:
                response = error_response(error.code, str(error), request_id=request.headers.get(REQUEST_ID_HEADER),
                                          http_status=error.http_status)
            else:
                response = await self._call(route, call, built, request, timeout)
            metrics.HTTP_REQUESTS.labels(route.method.name, str(response.status_code)).inc()
            return response

        return handle

    async def _call(self, route: HttpRoute, call: Any, built: message.Message, request: Request,
                    timeout: float | None) -> Response:
        pending = call(built, metadata=forwarded_metadata(request.headers), timeout=timeout)
        answered = asyncio.ensure_future(pending)
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait((answered, gone), return_when=asyncio.FIRST_COMPLETED)
            if not answered.done():  # the client went away: its call is cancelled, its work dropped
                pending.cancel()
                return error_response(grpc.StatusCode.CANCELLED, "the client disconnected")
            answer = answered.result()
        except grpc.aio.AioRpcError as error:
            return error_response(error.code(), error.details() or "", error.trailing_metadata())
        finally:
            gone.cancel()
            if not answered.done():
                pending.cancel()
        trailing = dict(await pending.trailing_metadata() or ())
        headers = {REQUEST_ID_HEADER: str(trailing.get(REQUEST_ID_HEADER, ""))}
        if route.method.name in CACHE_CONTROL:
            headers["cache-control"] = CACHE_CONTROL[route.method.name]
        if isinstance(answer, httpbody_pb2.HttpBody):
            etag = '"' + hashlib.sha256(answer.data).hexdigest() + '"'
            headers["etag"] = etag
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers=headers)
            return Response(answer.data, 200, headers, media_type=answer.content_type or "application/octet-stream")
        return _json(message_to_json(answer), 200, headers)
