"""The gateway's gRPC server: wiring of servicer, model watcher, health, reflection, interceptors and security.

``create_server`` takes its dependencies (Triton client, Redis client), so a test builds the whole gateway in
process on port 0; ``serve`` is what ``samserve gateway`` runs. :func:`samserve.security.loader.load_security` checks
the
security settings (docs/security.md) before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from samserve.core import memory, metrics, service_config
from samserve.core.api import SERVICE_NAME, pb_grpc
from samserve.core.settings import GatewaySettings
from samserve.security.loader import Security, load_security
from samserve.transport.http import app
from samserve.transport.interceptors import interceptors
from samserve.transport.model_watcher import ModelWatcher
from samserve.transport.servicer import SegmentAnythingServicer
from samserve.triton.models import TritonSam

LOG = logging.getLogger(__name__)


def connect_redis(settings: GatewaySettings, options: dict[str, Any] | None = None) -> Any | None:
    """A redis.asyncio client (or Cluster client) for tier 2, or None when no URL is configured; ``options``:
    AUTH and TLS (:func:`samserve.security.loader.redis_options`)."""
    if not settings.redis_url:
        LOG.warning("SAMSERVE_REDIS_URL is not set: embedding cache runs on tier 1 (in-process) alone")
        return None
    import redis.asyncio as redis_asyncio
    from redis.asyncio.cluster import RedisCluster

    timeout = settings.redis_timeout_s
    connect = RedisCluster.from_url if settings.redis_cluster else redis_asyncio.Redis.from_url
    return connect(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, **(options or {}))


@dataclasses.dataclass
class Gateway:
    """A started gateway: the gRPC server, the port it bound, and what :meth:`close` releases."""

    server: grpc.aio.Server
    port: int
    watcher: ModelWatcher
    triton: TritonSam
    redis: Any | None
    health_server: grpc.aio.Server | None = None
    """The plaintext health-only server on ``health_port`` (None when not configured)."""
    http: app.HttpServer | None = None
    """The HTTP/JSON transport on ``http_port`` (None when not configured)."""

    async def stop(self, grace_s: float | None) -> None:
        """Health NOT_SERVING, in-flight calls get ``grace_s`` to finish, then every resource is released."""
        await self.watcher.health.enter_graceful_shutdown()
        grpc_stopped = asyncio.ensure_future(self.server.stop(grace_s))
        if self.http is not None:  # its calls are gRPC calls: they drain with the gRPC server, at the same time
            await self.http.stop()
        await grpc_stopped
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.watcher.close()
        await self.triton.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


async def create_server(
    settings: GatewaySettings, triton: TritonSam, redis: Any | None, metrics_port: int | None = None,
    security: Security | None = None,
) -> Gateway:
    """Build and start the gateway on ``settings.gateway_host:gateway_port`` (port 0 picks a free one).

    ``metrics_port`` None serves no ``/metrics`` endpoint (the metrics are still counted). ``security`` None:
    :func:`load_security` of ``settings``."""
    security = security or load_security(settings)
    watcher = ModelWatcher(settings, triton, redis)
    server = grpc.aio.server(
        interceptors=interceptors(security.credentials),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_response_bytes + (16 << 20)),  # + the messages' framing
            *service_config.server_keepalive_options(),
            *service_config.server_connection_age_options(settings.max_connection_age_s,
                                                          settings.max_connection_age_grace_s),
        ],
    )
    pb_grpc.add_SegmentAnythingServicer_to_server(SegmentAnythingServicer(settings, triton, watcher), server)
    health_pb2_grpc.add_HealthServicer_to_server(watcher.health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    address = f"{settings.gateway_host}:{settings.gateway_port}"
    if security.certificates is not None:
        port = server.add_secure_port(address, security.certificates.credentials())
    else:
        port = server.add_insecure_port(address)
    socket_dir = internal = None
    if settings.http_port is not None:  # the HTTP transport calls this server over a private Unix socket
        socket_dir, internal = app.private_socket()
        server.add_insecure_port(internal)
    if metrics_port is not None:
        metrics.serve_metrics(metrics_port, settings.gateway_host)
    health_server = None
    if settings.health_port is not None:  # probes without TLS or keys; nothing but health is served there
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(watcher.health, health_server)
        health_server.add_insecure_port(f"{settings.gateway_host}:{settings.health_port}")
        await health_server.start()
    await server.start()
    await watcher.start()
    transport = ("plaintext" if security.certificates is None
                 else "mutual TLS" if security.certificates.mutual else "TLS")
    LOG.info("gateway listening on %s:%d (%s, auth %s, reflection %s)", settings.gateway_host, port, transport,
             "on" if security.credentials is not None else "OFF", "on" if settings.reflection else "off")
    http = None
    if socket_dir is not None and internal is not None:
        http = await app.start_http(settings, security.certificates, socket_dir, internal)
        scheme = "http" if security.certificates is None else "https"
        LOG.info("HTTP/JSON API and web page on %s://%s:%d/ (%s; OpenAPI at /openapi.json)", scheme,
                 settings.gateway_host, http.port, transport)
    return Gateway(server, port, watcher, triton, redis, health_server, http)


async def serve(settings: GatewaySettings, stop: asyncio.Event, security: Security | None = None) -> None:
    """Run the gateway until ``stop`` is set, then drain gracefully (health NOT_SERVING, in-flight calls finish).
    ``security`` None: :func:`load_security` of ``settings``, before any connection."""
    security = security or load_security(settings)
    memory.tune_allocator()
    triton = TritonSam(settings.triton_grpc_url, embedding_transport=settings.embedding_transport,
                       channel_max_age_s=settings.triton_channel_max_age_s,
                       channel_drain_s=settings.triton_timeout_s)
    gateway = await create_server(settings, triton, connect_redis(settings, security.redis_options),
                                  settings.metrics_port, security)
    try:
        await stop.wait()
    finally:
        LOG.info("gateway draining (grace %.0f s)", settings.shutdown_grace_s)
        await gateway.stop(settings.shutdown_grace_s)
