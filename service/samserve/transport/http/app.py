"""The HTTP/JSON transport's server: the ASGI app (the RPC routes, ``/openapi.json`` and the web page) served by
uvicorn inside the gateway's event loop.

One servicer, two transports: an HTTP call is transcoded (:mod:`samserve.transport.http.transcoding`) into the same
gRPC call a gRPC client would make, sent over a private Unix socket of the gateway's own gRPC server, so every rule
(auth, quotas, limits, validation, the status table, metrics, request ids) is the gRPC one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from samserve.core import service_config
from samserve.core.settings import GatewaySettings
from samserve.security.tls import ServerCertificates
from samserve.transport.call_context import REQUEST_ID_HEADER
from samserve.transport.http import interact_socket, openapi
from samserve.transport.http.routes import HttpRoute, http_routes
from samserve.transport.http.transcoding import TIMEOUT_HEADER, Transcoder, error_response

WEB_STATIC = Path(__file__).parents[2] / "web_static"  # samserve/web_static: package data
"""The built web page (``make web``: web/ bundled with onnxruntime-web); git-ignored."""


class IsolatedStaticFiles(StaticFiles):
    """The page's files with the headers that make it cross-origin isolated (COOP same-origin, COEP require-corp):
    SharedArrayBuffer, and so onnxruntime-web's decoder on several threads. The page loads nothing cross-origin."""

    ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(self.ISOLATION)
        return response


def create_app(channel: grpc.aio.Channel, max_request_bytes: int, cors_origins: tuple[str, ...] = (),
               web_static: Path = WEB_STATIC) -> Starlette:
    """The HTTP application: the RPC routes, the Interact WebSocket, ``/openapi.json``, and the web page at ``/``
    (when built)."""
    transcoder = Transcoder(channel, max_request_bytes)
    routes: list[BaseRoute] = [
        Route(route.template, transcoder.endpoint(route), methods=[route.verb], name=f"{route.method.name}:{i}")
        for i, route in enumerate(http_routes())
    ]
    routes += method_not_allowed_routes(http_routes())
    routes.append(WebSocketRoute(interact_socket.ROUTE, interact_socket.interact_endpoint(channel, max_request_bytes)))
    document = openapi.document(http_routes())
    routes.append(Route("/openapi.json", lambda request: JSONResponse(document), methods=["GET"]))
    if (web_static / "index.html").exists():
        routes.append(Mount("/", IsolatedStaticFiles(directory=web_static, html=True), name="web"))
    else:
        routes.append(Route("/", lambda request: PlainTextResponse(
            "the web page is not built: run `make web` (npm), then restart the gateway", 404), methods=["GET"]))
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type", REQUEST_ID_HEADER, TIMEOUT_HEADER],
                                     expose_headers=[REQUEST_ID_HEADER, "retry-after"]))
    return Starlette(routes=routes, middleware=middleware)



HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
"""The methods a route answers 405 for when they are not its own (OPTIONS stays CORS's; HEAD follows GET)."""


def method_not_allowed_routes(bindings: list[HttpRoute]) -> list[BaseRoute]:
    """For each path of the API, the methods it does not serve: 405 with ``Allow`` naming those it does (without
    these the page's catch-all mount would answer 404, as if the path did not exist)."""
    allowed: dict[str, set[str]] = {}
    for binding in bindings:
        allowed.setdefault(binding.template, set()).add(binding.verb)
    routes: list[BaseRoute] = []
    for template, verbs in allowed.items():
        allow = ", ".join(sorted(verbs | ({"HEAD"} if "GET" in verbs else set())))

        async def refuse(request: Request, allow: str = allow) -> Response:
            response = error_response(grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not allowed on "
                                      f"{request.url.path}; allowed: {allow}",
                                      request_id=request.headers.get(REQUEST_ID_HEADER), http_status=405)
            response.headers["allow"] = allow
            return response

        others = [method for method in HTTP_METHODS if method not in verbs]
        routes.append(Route(template, refuse, methods=others, name=f"405:{template}"))
    return routes


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns the process' signals and its shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclasses.dataclass
class HttpServer:
    """The running HTTP transport: uvicorn on ``port``, calling the gRPC server through ``channel``."""

    port: int
    server: uvicorn.Server
    task: asyncio.Task[None]
    channel: grpc.aio.Channel
    socket_dir: Path

    async def stop(self) -> None:
        """Stop accepting, let in-flight HTTP calls finish (their gRPC calls drain with the gRPC server)."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.channel.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def private_socket() -> tuple[Path, str]:
    """A folder only this user can enter, and the gRPC address of a Unix socket in it: the HTTP transport's way
    into the gRPC server (plaintext, so nothing but this process may reach it)."""
    folder = Path(tempfile.mkdtemp(prefix="samserve-http-"))
    return folder, f"unix:{folder / 'grpc.sock'}"


async def start_http(settings: GatewaySettings, certificates: ServerCertificates | None, socket_dir: Path,
                     grpc_address: str) -> HttpServer:
    """Serve the HTTP transport on ``settings.gateway_host:http_port`` (TLS and mutual TLS as the gRPC port),
    calling the gRPC server at ``grpc_address`` (:func:`private_socket`)."""
    assert settings.http_port is not None
    limit = settings.max_request_bytes + (1 << 20)
    # The clients' retry policy: the gRPC server closes this connection too at its maximum age (GOAWAY), and a call
    # caught by that is retried once on the next connection instead of answering 503.
    channel = grpc.aio.insecure_channel(grpc_address, options=[
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", settings.max_response_bytes + (16 << 20)),
        ("grpc.service_config", service_config.service_config(attempts=2)),
    ])
    app = create_app(channel, settings.max_request_bytes, tuple(settings.http_cors_origins))
    tls: dict[str, Any] = {}
    if certificates is not None:  # uvicorn's own context is replaced below by one that follows rotations
        tls = {"ssl_certfile": str(certificates.cert_file), "ssl_keyfile": str(certificates.key_file)}
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                            ws="wsproto", timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s), **tls)
    config.load()
    if certificates is not None:
        config.ssl = certificates.ssl_context()
    listener = socket.create_server((settings.gateway_host, settings.http_port), reuse_port=False)
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[listener]), name="http")
    while not server.started and not task.done():
        await asyncio.sleep(0.01)  # uvicorn has no started event; bounded by its start-up (or failure)
    if task.done():
        task.result()  # raises what made uvicorn fail
        raise RuntimeError("the HTTP server stopped while starting")
    return HttpServer(int(listener.getsockname()[1]), server, task, channel, socket_dir)
