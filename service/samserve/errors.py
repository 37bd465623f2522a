"""Typed domain errors and the ONE place that maps them (and Triton's failures) to gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.utils import InferenceServerException

from samserve import metrics

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
    (client gone or deadline passed) drops its work. Every call is counted and timed by method and code."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        metrics.INFLIGHT.labels(name).inc()
        try:
            return await method(self, request, context)
        except InferenceServerException as error:
            translated = from_triton(error)
            code = translated.code
            await context.abort(code, str(translated))
        except SamServeError as error:
            code = error.code
            await context.abort(code, str(error))
        except (asyncio.TimeoutError, TimeoutError):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(code, "deadline exceeded")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # noqa: BLE001 - the last resort keeps the message generic and logs the cause
            if context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()
                raise
            code = grpc.StatusCode.INTERNAL
            LOG.exception("unexpected failure in %s", name)
            await context.abort(code, "internal error (logged by the gateway)")
        finally:
            metrics.INFLIGHT.labels(name).dec()
            metrics.RPC_REQUESTS.labels(name, code.name).inc()
            metrics.RPC_DURATION.labels(name, code.name).observe(time.perf_counter() - started)
        raise AssertionError("unreachable")

    return wrapper
