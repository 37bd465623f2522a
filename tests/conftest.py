"""Shared fixtures: exported models (seeded random weights), a real Triton server per model, a real Redis,
gateway processes, and synthetic images."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from samserve import model_spec, triton_server
from samserve_build.settings import SCENES_CHECKPOINT
from samserve.redis_server import RedisServer
from samserve_build import export
from samserve_build.local_stack import GatewayProcess, free_port, serve_locally
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
    with serve_locally(model.directory, root, TRITON_START_TIMEOUT_S) as server:
        yield ServedModel(model, server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return export_random("tiny", 0, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vit_b_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return export_random("vit_b", 0, tmp_path_factory.mktemp("vit_b"))


@pytest.fixture(scope="session")
def scenes_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """The shipped model trained on generated scenes, exported through the same exporter as Meta's checkpoints."""
    result = export.export_model("scenes", SCENES_CHECKPOINT, tmp_path_factory.mktemp("scenes") / "model")
    return ExportedModel("scenes", SCENES_CHECKPOINT, result.directory, result.metadata)


@pytest.fixture(scope="session")
def scenes_triton(scenes_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    yield from serve(scenes_model, tmp_path_factory.mktemp("scenes-triton"))


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
