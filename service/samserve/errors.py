"""Typed domain errors and the ONE place that maps them (and Triton's failures) to gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.utils import InferenceServerException

LOG = logging.getLogger(__name__)


class SamServeError(Exception):
    """Base of the errors a client sees; ``code`` is part of the API."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SamServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SamServeError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(SamServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SamServeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SamServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_TRITON_STATUS = {
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.NOT_FOUND": Unavailable,  # model not loaded
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
}


def from_triton(error: InferenceServerException) -> SamServeError:
    """A Triton client failure as a domain error: unreachable / model not ready -> Unavailable, etc."""
    status = str(error.status())
    message = error.message() or str(error)
    kind = _TRITON_STATUS.get(status)
    if kind is None and ("not ready" in message or "unknown model" in message or "failed to connect" in message.lower()):
        kind = Unavailable
    return (kind or SamServeError)(f"Triton: {message}")


T = TypeVar("T")


def grpc_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Servicer-method decorator: domain and Triton errors become precise status codes; a cancelled call
    (client gone or deadline passed) drops its work."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except InferenceServerException as error:
            translated = from_triton(error)
            await context.abort(translated.code, str(translated))
        except SamServeError as error:
            await context.abort(error.code, str(error))
        except (asyncio.TimeoutError, TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the last resort keeps the message generic and logs the cause
            if context.code() is not None and context.code() != grpc.StatusCode.OK:
                raise
            LOG.exception("unexpected failure in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the gateway)")
        raise AssertionError("unreachable")

    return wrapper
