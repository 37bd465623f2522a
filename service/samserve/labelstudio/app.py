"""The ML backend's HTTP app (Starlette, served by uvicorn): the routes Label Studio calls.

* ``GET /health`` (and ``/``): 200 ``{"status": "UP"}`` while the gateway is SERVING, else 503 (Label Studio asks
  before it adds the backend and gives it 1 s);
* ``POST /setup``: 200 ``{"model_version"}`` for a labeling config the backend answers, else 422 ``{"error"}``
  naming the tag it cannot answer (Label Studio then refuses to add the backend);
* ``POST /predict``: ``{"results": [...]}``, one per task (:mod:`samserve.labelstudio.backend`); 400/422
  ``{"error"}`` for a body or a labeling config it cannot use;
* ``POST /webhook``: 200 (there is nothing to train).

Route handlers are plain functions: Starlette runs them in its thread pool, where the blocking gRPC client waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from samserve.client.typed_client import SamServeClient
from samserve.core.api import SERVICE_NAME
from samserve.core.settings import ClientSettings
from samserve.labelstudio.backend import BadRequest, SamBackend
from samserve.labelstudio.config import UnsupportedConfig
from samserve.labelstudio.images import ImageSource
from samserve.labelstudio.settings import LabelStudioSettings

LOG = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 0.5
"""The gateway's health check: half of the second Label Studio waits for /health."""
ERROR_STATUS: dict[type[Exception], int] = {BadRequest: 400, UnsupportedConfig: 422}
"""Errors of a whole request -> HTTP status (per-task errors are answered in the task's place)."""


def gateway_health(client: SamServeClient) -> str:
    """The gateway's serving status for the SegmentAnything service, or the reason there is none."""
    stub = health_pb2_grpc.HealthStub(client.channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=HEALTH_TIMEOUT_S)
    except grpc.RpcError as error:
        return f"unreachable ({error.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _json_route(work: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Request], Awaitable[JSONResponse]]:
    """A POST handler: the JSON body to ``work``, its answer as JSON, whole-request errors by ERROR_STATUS."""

    async def handler(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
        except ValueError as error:
            return JSONResponse({"error": f"body: {error}"}, 400)
        try:
            return JSONResponse(await run_in_threadpool(work, body))
        except tuple(ERROR_STATUS) as error:
            LOG.warning("%s: %s", request.url.path, error)
            return JSONResponse({"error": str(error)}, ERROR_STATUS[type(error)])

    return handler


def create_app(backend: SamBackend, health: Callable[[], str]) -> Starlette:
    def health_route(request: Request) -> JSONResponse:
        status = health()
        up = status == "SERVING"
        return JSONResponse({"status": "UP" if up else "DOWN", "model_class": "samserve", "gateway": status},
                            200 if up else 503)

    return Starlette(routes=[
        Route("/", health_route, methods=["GET"]),
        Route("/health", health_route, methods=["GET"]),
        Route("/setup", _json_route(backend.setup), methods=["POST"]),
        Route("/predict", _json_route(backend.predict), methods=["POST"]),
        Route("/webhook", lambda request: JSONResponse({"status": "ok"}), methods=["POST"]),
    ])


def serve(settings: LabelStudioSettings) -> int:
    """Run the backend until interrupted."""
    client = SamServeClient(settings.gateway, timeout_s=settings.timeout_s, security=ClientSettings())
    images = ImageSource(settings)
    app = create_app(SamBackend(settings, client, images), lambda: gateway_health(client))
    LOG.info("Label Studio ML backend on http://%s:%d, gateway %s", settings.host, settings.port, settings.gateway)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.value.lower())
    finally:
        images.close()
        client.close()
    return 0
