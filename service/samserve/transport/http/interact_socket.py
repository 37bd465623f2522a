"""``Interact`` over HTTP: the WebSocket ``/v1/interact``, bridged to the gateway's own gRPC ``Interact`` over the
private socket (so auth, quotas, bounds, metrics and the status table are the gRPC ones).

Frames: each text frame the client sends is one ``InteractRequest`` in protobuf JSON (``{"open": {...}}`` first,
then ``{"event": {"id": "1", "addPoint": {...}}}``); each frame it receives is one ``InteractResponse`` in JSON.
The session's end: after the answer to ``finish`` the server closes with code 1000; an error sends one last frame
``{"error": <google.rpc.Status as JSON>}`` (as the HTTP routes' error bodies) and closes with 1008 for a client's
fault (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED) or 1011 otherwise.
Handshake headers: ``Authorization``, ``X-Request-Id``, ``X-Timeout-S``, as the HTTP routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from starlette.websockets import WebSocket, WebSocketDisconnect

from samserve.core import metrics
from samserve.core.api import SERVICE_NAME, pb
from samserve.transport.call_context import REQUEST_ID_HEADER
from samserve.transport.http import transcoding

ROUTE = "/v1/interact"
CLIENT_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Errors that close the socket with 1008 (policy violation: the client's to fix); the others close with 1011."""
NORMAL_CLOSURE, POLICY_VIOLATION, INTERNAL_ERROR = 1000, 1008, 1011


class _BadFrame:
    """A frame that is not an InteractRequest in JSON (or too large): why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def interact_endpoint(channel: grpc.aio.Channel, max_request_bytes: int) -> Any:
    """The ASGI WebSocket endpoint of ``/v1/interact`` calling ``Interact`` on ``channel``."""
    call_interact = channel.stream_stream(
        f"/{SERVICE_NAME}/Interact", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.InteractResponse.FromString)
    frame_limit = max_request_bytes * 4 // 3 + transcoding.BASE64_SLACK

    async def endpoint(socket: WebSocket) -> None:
        try:
            timeout = transcoding.request_timeout(socket.headers)
        except transcoding.HttpError as error:
            await socket.close(POLICY_VIOLATION, str(error)[:120])
            return
        await socket.accept()
        received: asyncio.Queue[pb.InteractRequest | _BadFrame | None] = asyncio.Queue()

        async def frames() -> None:
            try:
                while True:
                    text = await socket.receive_text()
                    if len(text) > frame_limit:
                        received.put_nowait(_BadFrame(f"a frame of {len(text)} characters is over the limit of "
                                                      f"{frame_limit} (SAMSERVE_MAX_REQUEST_BYTES, x 4/3 for base64)"))
                        return
                    message = pb.InteractRequest()
                    try:
                        json_format.Parse(text, message)
                    except json_format.ParseError as error:
                        received.put_nowait(_BadFrame(f"a frame is not an InteractRequest in JSON: {error}"))
                        return
                    received.put_nowait(message)
            except (WebSocketDisconnect, RuntimeError):
                received.put_nowait(None)

        bad_frame: list[str] = []

        async def requests() -> AsyncIterator[pb.InteractRequest]:
            """The frames as messages; a bad frame ends them (the session is then refused, below)."""
            while (item := await received.get()) is not None:
                if isinstance(item, _BadFrame):
                    bad_frame.append(str(item))
                    return
                yield item

        reader = asyncio.create_task(frames())
        call = call_interact(requests(), metadata=transcoding.forwarded_metadata(socket.headers), timeout=timeout)
        code = grpc.StatusCode.OK
        try:
            try:
                async for response in call:
                    if bad_frame:
                        break
                    await socket.send_text(json.dumps(transcoding.message_to_json(response), separators=(",", ":")))
            except grpc.aio.AioRpcError as error:
                if not bad_frame:
                    code = error.code()
                    await _send_error(socket, code, error.details() or "", error.trailing_metadata())
            if bad_frame:
                call.cancel()
                code = grpc.StatusCode.INVALID_ARGUMENT
                await _send_error(socket, code, bad_frame[0], (), socket.headers.get(REQUEST_ID_HEADER))
            elif code is grpc.StatusCode.OK:
                await socket.close(NORMAL_CLOSURE)
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-answer: its session is cancelled
            code = grpc.StatusCode.CANCELLED
            call.cancel()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            metrics.HTTP_REQUESTS.labels("Interact", str(transcoding.HTTP_STATUS.get(code, 500))).inc()

    return endpoint


async def _send_error(socket: WebSocket, code: grpc.StatusCode, text: str, trailers: Any,
                      request_id: str | None = None) -> None:
    """The last frame, ``{"error": status}``, then the close code of ``code``."""
    status = transcoding.status_json(code, text, trailers)
    if request_id and not status.get("details"):
        status["details"] = [{"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id}]
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await socket.send_text(json.dumps({"error": status}, separators=(",", ":")))
        await socket.close(POLICY_VIOLATION if code in CLIENT_FAULTS else INTERNAL_ERROR, code.name)
