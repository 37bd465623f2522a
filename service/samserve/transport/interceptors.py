"""What every RPC of ``samserve.v1.SegmentAnything`` gets, as grpc.aio server interceptors (outermost first), the
unary ones and the Interact stream alike (each interceptor is a scope around the call: a stream's lasts until its
last answer is sent):

* :class:`RequestIdInterceptor`: a request id (the client's ``x-request-id`` metadata, else a new one) in a
  context variable that every log record of the call carries (:class:`RequestIdLogFilter`); sent back as
  trailing metadata.
* :class:`ErrorInterceptor`: applies THE table from errors to status codes
  (:data:`samserve.transport.status.STATUS_CODES`), with rich status details: a ``google.rpc.BadRequest`` field
  violation when a request field is at fault, the request id as ``google.rpc.RequestInfo``. Anything unmapped is
  INTERNAL with a generic message; the cause is logged. Requests are parsed inside the interceptors (innermost),
  so a malformed message is INVALID_ARGUMENT, never gRPC's UNKNOWN.
* :class:`MetricsInterceptor`: the in-flight gauge, the request counter and the latency histogram, by
  method and final status code (the code the status table gives the error: the one the client receives).
* :class:`AuthInterceptor` (when auth is on): the caller's API key or JWT (``authorization: Bearer``) decides
  (:meth:`samserve.security.credentials.Credentials.authorize`); a refused call raises Unauthenticated /
  PermissionDenied without
  parsing its request, so it is mapped, counted and logged like any error. The key's tenant is in a context
  variable that log records carry. ``grpc.health.v1.Health`` is open to all (probes); any other service
  (reflection) needs a valid key.
* :class:`QuotaInterceptor` (innermost, with auth): takes one request from the tenant's bucket
  (:mod:`samserve.security.quotas`) and makes the tenant's quota the call's :data:`samserve.security.quotas.current`,
  which the
  embedder (encodes) and the servicer (decoder prompts) charge.

Servicer methods just raise :mod:`samserve.core.errors`. A ResourceExhausted that knows when a retry may succeed
sends it as ``retry-after`` trailing metadata (seconds, decimal) and a ``google.rpc.RetryInfo``; one naming what
ran out adds a ``google.rpc.QuotaFailure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from samserve.core import metrics
from samserve.core.api import SERVICE_NAME
from samserve.core.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SamServeError,
    Unauthenticated,
)
from samserve.security import quotas
from samserve.security.credentials import Credentials
from samserve.transport.call_context import REQUEST_ID_HEADER, VALID_REQUEST_ID, request_id, tenant
from samserve.transport.status import (
    MESSAGES,
    RETRY_AFTER_HEADER,
    STATUS_DETAILS_HEADER,
    status_code,
    status_details,
)

LOG = logging.getLogger(__name__)


HEALTH_SERVICE = "grpc.health.v1.Health"

Scope = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]
"""What an interceptor does around one call, whatever its kind: entered before the method runs, left when it
ends (a stream: when its last answer is sent), seeing the error that ends it."""


def _ours(details: grpc.HandlerCallDetails) -> bool:
    return details.method.startswith(f"/{SERVICE_NAME}/")


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1]


def _parse(parse: Callable[[bytes], Any], request: bytes) -> Any:
    """A request message from its bytes: one that does not parse is InvalidArgument (raised inside the
    interceptors, so it is mapped, counted and logged like any error; gRPC's own deserialization answers UNKNOWN)."""
    try:
        return parse(request)
    except DecodeError:
        raise InvalidArgument("the request is not a valid serialized message of this method") from None


def _wrap(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """``handler`` (unary-unary or stream-stream) with ``scope`` around each call. The requests reach the wrappers
    as bytes and are parsed innermost (each wrapping moves the parse inside the new wrapper)."""
    parse = handler.request_deserializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context):
                return await inner(_parse(parse, request) if parse else request, context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
    stream_inner = handler.stream_stream

    async def parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield _parse(parse, request) if parse else request

    async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with scope(context):
            async for response in stream_inner(parsed(requests), context):
                yield response

    return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)


def _wrappable(handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails) -> bool:
    """Our service's methods (unary, and the bidirectional Interact); health and reflection pass untouched."""
    return (handler is not None and _ours(details)
            and (handler.unary_unary is not None or handler.stream_stream is not None))


def _reset(variable: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    """``variable.reset(token)``, tolerating a stream's generator closed from another context (the call is over
    either way)."""
    with contextlib.suppress(ValueError):
        variable.reset(token)


class _CallInterceptor(grpc.aio.ServerInterceptor):
    """Puts :meth:`scope` around each call of our service's methods."""

    def scope(self, method: str, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not _wrappable(handler, handler_call_details):
            return handler
        method = _method_name(handler_call_details)
        return _wrap(handler, lambda context: self.scope(method, context))


class RequestIdInterceptor(_CallInterceptor):
    """Sets :data:`request_id` for the call and returns it to the client as trailing metadata; scopes
    :data:`tenant` to the call (AuthInterceptor sets it)."""

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER, "")
        value = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token, tenant_token = request_id.set(value), tenant.set("-")
        try:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, value),))  # sent with the status: no extra write
            yield
        finally:
            _reset(tenant, tenant_token)  # AuthInterceptor (inside) set it for the whole call
            _reset(request_id, token)


class MetricsInterceptor(_CallInterceptor):
    """In-flight gauge, request counter and latency histogram by method and final status code (an Interact
    session counts once, for its whole life)."""

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        metrics.INFLIGHT.labels(method).inc()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # the code ErrorInterceptor (outside) will send: counted before it is sent
            code = status_code(error) or grpc.StatusCode.INTERNAL
            raise
        finally:
            metrics.INFLIGHT.labels(method).dec()
            metrics.RPC_REQUESTS.labels(method, code.name).inc()
            metrics.TENANT_REQUESTS.labels(metrics.tenant_label(tenant.get()), method, code.name).inc()
            metrics.RPC_DURATION.labels(method, code.name).observe(time.perf_counter() - started)


class ErrorInterceptor(_CallInterceptor):
    """Raised errors become status codes (:data:`samserve.transport.status.STATUS_CODES`) with rich details; a
    cancelled call (client gone or deadline passed) drops its work; anything else is INTERNAL, logged with its
    request id."""

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - every failure leaves as a status, never a traceback
            code = status_code(error)
            if code is None or code is grpc.StatusCode.INTERNAL:
                LOG.error("%s failed", method, exc_info=error)
                message = f"internal error (logged by the gateway as request {request_id.get()})"
                code = grpc.StatusCode.INTERNAL
            elif isinstance(error, SamServeError):
                message = str(error)
            else:
                message = next(text for kind, text in MESSAGES.items() if isinstance(error, kind))
            status = status_details(code, message, error)
            trailers: tuple[tuple[str, str | bytes], ...] = (
                (STATUS_DETAILS_HEADER, status.SerializeToString()), (REQUEST_ID_HEADER, request_id.get()))
            if isinstance(error, ResourceExhausted) and error.retry_after_s is not None:
                trailers += ((RETRY_AFTER_HEADER, f"{error.retry_after_s:.3f}"),)
            await context.abort(code, message, trailing_metadata=trailers)


def _refusal(handler: grpc.RpcMethodHandler, error: SamServeError, ours: bool) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses the call without parsing its request: our methods raise
    ``error`` (mapped and counted by the interceptors outside), other services' methods (reflection, passed
    through untouched by them) abort with its code."""
    if ours and handler.unary_unary is not None:
        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise error

        return grpc.unary_unary_rpc_method_handler(refuse_unary, response_serializer=handler.response_serializer)
    if ours and handler.stream_stream is not None:
        async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            raise error
            yield  # an async generator, as the wrappers outside expect

        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status_code(error) or grpc.StatusCode.INTERNAL, str(error))

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authentication (API keys, JWTs) and per-RPC permission; health checks pass without a key. Sets
    :data:`tenant`."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        ours = _ours(handler_call_details)
        method = _method_name(handler_call_details)
        try:
            caller = self.credentials.authorize(method if ours else None, handler_call_details.invocation_metadata)
        except (Unauthenticated, PermissionDenied) as error:
            LOG.debug("refused %s: %s", handler_call_details.method, error)
            return _refusal(handler, error, ours)
        if not _wrappable(handler, handler_call_details):
            return handler

        @contextlib.asynccontextmanager
        async def as_tenant(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            # Not reset here: the outer interceptors' log lines (an INTERNAL error) name the tenant too;
            # RequestIdInterceptor, outermost, ends its scope with the call.
            tenant.set(caller.tenant)
            yield

        return _wrap(handler, as_tenant)


class QuotaInterceptor(_CallInterceptor):
    """One request from the tenant's bucket (set by AuthInterceptor, outside), then the tenant's quota is
    :data:`samserve.security.quotas.current` for the call (an Interact session: one request, then one decoder
    prompt per decode)."""

    def __init__(self, tenant_quotas: quotas.Quotas) -> None:
        self.quotas = tenant_quotas

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        quota = self.quotas.of(tenant.get())
        quota.charge(quotas.Limit.REQUESTS)
        token = quotas.current.set(quota)
        try:
            yield
        finally:
            _reset(quotas.current, token)


def interceptors(credentials: Credentials | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The gateway's interceptors, outermost first; ``credentials`` None: auth off (and no quotas). Metrics sit inside
    the error mapping: an aborted call's status reaches the client as soon as it is sent, so it is counted before
    (a client that scrapes /metrics after its error sees it counted). Auth and quotas sit inside both: refusals
    are mapped and counted."""
    chain: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(), ErrorInterceptor(), MetricsInterceptor()]
    if credentials is None:
        return chain
    return [*chain, AuthInterceptor(credentials), QuotaInterceptor(quotas.Quotas(credentials.limits))]


