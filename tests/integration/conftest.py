"""The integration tier's fixtures: exported models (seeded random weights and the shipped checkpoint), a real
Triton server per model, a real Redis, real gateway processes. Every test under tests/integration is marked
``integration``.

Gateways: ``gateway`` / ``scenes_gateway`` are one process per test module, for tests that neither stop them nor
read their log or count their metrics (each such test sends images no other test sent, see
``samserve_dev.images.new_image``); tests that do any of that, need an empty tier 1 or other settings, start
their own with ``gateway_factory`` (per test) or ``module_gateway_factory`` (per module)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from samserve.core.settings import ClientSettings
from samserve.launch.redis_server import RedisServer
from samserve_build import export
from samserve_build.settings import SCENES_CHECKPOINT
from samserve_dev.local_stack import GatewayProcess, free_port
from samserve_dev.served_models import ExportedModel, ServedModel, export_random, serve

HERE = Path(__file__).parent
# The exporter traces the official modules; pyproject cannot name this category (resolving it imports torch in
# every session, the unit tier's included).
TRACER_WARNINGS = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
            item.add_marker(TRACER_WARNINGS)


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


GatewayFactory = Callable[..., GatewayProcess]


@contextlib.contextmanager
def _gateways(workdir: Path) -> Iterator[GatewayFactory]:
    """A factory of gateway processes under ``workdir``; all of them are stopped on exit."""
    started: list[GatewayProcess] = []

    def make(triton_url: str, redis_url: str | None, wait_serving: bool = True, client: ClientSettings | None = None,
             **settings: object) -> GatewayProcess:
        gateway = GatewayProcess(triton_url, redis_url, workdir, client, **settings).start(wait_serving=wait_serving)
        started.append(gateway)
        return gateway

    try:
        yield make
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways for a test; all are stopped at its end."""
    with _gateways(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """Start gateways that a whole test module shares; all are stopped at its end."""
    with _gateways(tmp_path_factory.mktemp("module-gateways")) as make:
        yield make


@pytest.fixture(scope="module")
def gateway(tiny_triton: ServedModel, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway per test module: tiny Triton and the session's Redis, default settings."""
    with _gateways(tmp_path_factory.mktemp("gateway")) as make:
        yield make(tiny_triton.url, redis_server.url)


@pytest.fixture(scope="module")
def scenes_gateway(scenes_triton: ServedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway per test module on the shipped model, without Redis."""
    with _gateways(tmp_path_factory.mktemp("scenes-gateway")) as make:
        yield make(scenes_triton.url, None)
