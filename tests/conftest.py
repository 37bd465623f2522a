"""Shared fixtures: exported models (seeded random weights), a real Triton server per model, the official
``SamPredictor`` on the same weights, and synthetic images."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from samserve import model_spec, triton_server  # noqa: F401
from samserve.redis_server import RedisServer
from samserve_build import export, repository
from samserve_build.repository import free_port  # noqa: F401  (re-exported for tests)
from samserve_build.synthetic import synthetic_image  # noqa: F401  (re-exported for tests)


TRITON_START_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    variant: str
    checkpoint: Path
    directory: Path
    metadata: model_spec.ModelMetadata


@dataclasses.dataclass(frozen=True)
class ServedModel:
    model: ExportedModel
    server: triton_server.TritonServer

    @property
    def url(self) -> str:
        return self.server.grpc_url


def export_random(variant: str, seed: int, root: Path) -> ExportedModel:
    result = export.export_random_weights(variant, seed, root / "model")
    return ExportedModel(variant, result.checkpoint, result.directory, result.metadata)


def serve(model: ExportedModel, root: Path) -> Iterator[ServedModel]:
    with repository.serve_locally(model.directory, root, TRITON_START_TIMEOUT_S) as server:
        yield ServedModel(model, server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return export_random("tiny", 0, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vit_b_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return export_random("vit_b", 0, tmp_path_factory.mktemp("vit_b"))


@pytest.fixture(scope="session")
def tiny_triton(tiny_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    yield from serve(tiny_model, tmp_path_factory.mktemp("tiny-triton"))


@pytest.fixture(scope="session")
def vit_b_triton(vit_b_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    yield from serve(vit_b_model, tmp_path_factory.mktemp("vit_b-triton"))


@pytest.fixture(scope="session")
def event_loop_runner() -> Iterator[asyncio.Runner]:
    """One event loop for the session's async Triton clients."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class GatewayProcess:
    """`samserve gateway` as a real process on a free port (settings through SAMSERVE_* variables)."""

    def __init__(self, triton_url: str, redis_url: str | None, workdir: Path, **settings: object) -> None:
        host, port = triton_url.rsplit(":", 1)
        self.port = free_port()
        self.env = dict(
            os.environ,
            SAMSERVE_WORKDIR=str(workdir),
            SAMSERVE_GATEWAY_PORT=str(self.port),
            SAMSERVE_TRITON_HOST=host,
            SAMSERVE_TRITON_GRPC_PORT=port,
            SAMSERVE_HEALTH_CHECK_INTERVAL_S="0.2",
            SAMSERVE_FAILURE_LOG_INTERVAL_S="0",
        )
        if redis_url:
            self.env["SAMSERVE_REDIS_URL"] = redis_url
        self.env.update({f"SAMSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = Path(workdir) / f"gateway-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_serving: bool = True, timeout_s: float = 60.0) -> "GatewayProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "samserve"), "gateway"], env=self.env,
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            status = self.health()
            if status == "SERVING" or (status is not None and not wait_serving):
                return self
            time.sleep(0.1)
        raise AssertionError(f"gateway not serving after {timeout_s} s:\n{self.log()}")

    def health(self, service: str = "") -> str | None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
            except grpc.RpcError:
                return None
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "GatewayProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    """Start gateways for a test; all are stopped at its end."""
    started: list[GatewayProcess] = []

    def make(triton_url: str, redis_url: str | None, wait_serving: bool = True, **settings: object) -> GatewayProcess:
        gateway = GatewayProcess(triton_url, redis_url, tmp_path, **settings).start(wait_serving=wait_serving)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()
