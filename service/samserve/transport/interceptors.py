"""What every RPC of ``samserve.v1.SegmentAnything`` gets, as grpc.aio server interceptors (outermost first):

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
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
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

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _ours(details: grpc.HandlerCallDetails) -> bool:
    return details.method.startswith(f"/{SERVICE_NAME}/")


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1]


def _parsing(behavior: Behavior, parse: Callable[[bytes], Any] | None) -> Behavior:
    """``behavior`` taking the request's bytes: a message that does not parse is InvalidArgument (raised inside the
    interceptors, so it is mapped, counted and logged like any error; gRPC's own deserialization answers UNKNOWN)."""
    if parse is None:
        return behavior

    async def parsed(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            message = parse(request)
        except DecodeError:
            raise InvalidArgument("the request is not a valid serialized message of this method") from None
        return await behavior(message, context)

    return parsed


def _wrap_unary(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior]) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior wrapped; the request reaches the wrappers as bytes and is parsed innermost
    (each wrapping moves the parse inside the new wrapper)."""
    return grpc.unary_unary_rpc_method_handler(
        wrap(_parsing(handler.unary_unary, handler.request_deserializer)), request_deserializer=None,
        response_serializer=handler.response_serializer,
    )


class _UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary methods of our service (health and reflection pass through untouched)."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not _ours(handler_call_details):
            return handler
        method = _method_name(handler_call_details)
        return _wrap_unary(handler, lambda behavior: self.wrap(method, behavior))


class RequestIdInterceptor(_UnaryInterceptor):
    """Sets :data:`request_id` for the call and returns it to the client as trailing metadata; scopes
    :data:`tenant` to the call (AuthInterceptor sets it)."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def with_request_id(request: Any, context: grpc.aio.ServicerContext) -> Any:
            given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER, "")
            value = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
            token, tenant_token = request_id.set(value), tenant.set("-")
            try:
                context.set_trailing_metadata(((REQUEST_ID_HEADER, value),))  # sent with the status: no extra write
                return await behavior(request, context)
            finally:
                tenant.reset(tenant_token)  # AuthInterceptor (inside) set it for the whole call
                request_id.reset(token)

        return with_request_id


class MetricsInterceptor(_UnaryInterceptor):
    """In-flight gauge, request counter and latency histogram by method and final status code."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            metrics.INFLIGHT.labels(method).inc()
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
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

        return measured


class ErrorInterceptor(_UnaryInterceptor):
    """Raised errors become status codes (:data:`samserve.transport.status.STATUS_CODES`) with rich details; a
    cancelled call (client gone
    or deadline passed) drops its work; anything else is INTERNAL, logged with its request id."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
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

        return mapped


def _refusal(handler: grpc.RpcMethodHandler, error: SamServeError) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that raises ``error`` (our unary methods: mapped by ErrorInterceptor) or
    aborts with its code (other services' streaming methods, which the outer interceptors pass through). Its
    request is never parsed."""
    if handler.unary_unary is not None:
        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise error

        return grpc.unary_unary_rpc_method_handler(refuse_unary, response_serializer=handler.response_serializer)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status_code(error) or grpc.StatusCode.INTERNAL, str(error))

    kinds = {
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
            return _refusal(handler, error)
        if not ours or handler.unary_unary is None:
            return handler

        def with_tenant(behavior: Behavior) -> Behavior:
            async def as_tenant(request: Any, context: grpc.aio.ServicerContext) -> Any:
                # Not reset here: the outer interceptors' log lines (an INTERNAL error) name the tenant too;
                # RequestIdInterceptor, outermost, ends its scope with the call.
                tenant.set(caller.tenant)
                return await behavior(request, context)

            return as_tenant

        return _wrap_unary(handler, with_tenant)


class QuotaInterceptor(_UnaryInterceptor):
    """One request from the tenant's bucket (set by AuthInterceptor, outside), then the tenant's quota is
    :data:`samserve.security.quotas.current` for the call."""

    def __init__(self, tenant_quotas: quotas.Quotas) -> None:
        self.quotas = tenant_quotas

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def within_quota(request: Any, context: grpc.aio.ServicerContext) -> Any:
            quota = self.quotas.of(tenant.get())
            quota.charge(quotas.Limit.REQUESTS)
            token = quotas.current.set(quota)
            try:
                return await behavior(request, context)
            finally:
                quotas.current.reset(token)

        return within_quota


def interceptors(credentials: Credentials | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The gateway's interceptors, outermost first; ``credentials`` None: auth off (and no quotas). Metrics sit inside
    the error mapping: an aborted call's status reaches the client as soon as it is sent, so it is counted before
    (a client that scrapes /metrics after its error sees it counted). Auth and quotas sit inside both: refusals
    are mapped and counted."""
    chain: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(), ErrorInterceptor(), MetricsInterceptor()]
    if credentials is None:
        return chain
    return [*chain, AuthInterceptor(credentials), QuotaInterceptor(quotas.Quotas(credentials.limits))]


