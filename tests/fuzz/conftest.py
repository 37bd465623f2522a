"""The fuzz tier's fixtures: the integration tier's real Triton (``tiny`` model, seeded random weights) and real Redis,
and one real `samserve gateway` process that every fuzz test of the session sends its hostile requests to (auth
off). Every test under tests/fuzz is marked ``fuzz``; the replay of the committed corpus and regressions runs first.
The generation budget is ``SAMSERVE_FUZZ_SECONDS`` (:mod:`tests.fuzz.harness`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from samserve.api import pb
from samserve.redis_server import RedisServer
from tests.fuzz.harness import SEED_IMAGE_HW, FuzzTarget
from tests.fuzz.strategies import corpus_path
from tests.integration.conftest import TRACER_WARNINGS, redis_server, tiny_model, tiny_triton  # noqa: F401
from tests.support.local_stack import GatewayProcess
from tests.support.served_models import ServedModel

HERE = Path(__file__).parent
REPLAY_FIRST = "test_replay.py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: hypothesis fuzzing of the real gateway (every test under tests/fuzz)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.fuzz)
            item.add_marker(TRACER_WARNINGS)  # the tiny model's export traces the official modules
    # The committed cases replay before any generation (a stable sort keeps every other order as collected).
    items.sort(key=lambda item: not (item.path.is_relative_to(HERE) and item.path.name == REPLAY_FIRST))


@pytest.fixture(scope="session")
def fuzz_target(tiny_triton: ServedModel, redis_server: RedisServer,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """The gateway under fuzz, with the seed image (tests/fuzz/corpus/seed.png) embedded; after the session it must
    still be alive and exit cleanly on SIGTERM."""
    gateway = GatewayProcess(tiny_triton.url, redis_server.url, tmp_path_factory.mktemp("fuzz-gateway")).start()
    try:
        # Plaintext like the gateway; no client-side receive limit, so RESOURCE_EXHAUSTED is always the server's.
        with grpc.insecure_channel(gateway.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            raw = channel.unary_unary("/samserve.v1.SegmentAnything/Embed")(
                pb.EmbedRequest(image=corpus_path("seed.png").read_bytes()).SerializeToString(), timeout=60)
            embedded = pb.EmbedResponse.FromString(raw)
            assert (embedded.height, embedded.width) == SEED_IMAGE_HW
            target = FuzzTarget(gateway, channel, embedded.image_id)
            yield target
        assert gateway.process is not None and gateway.process.poll() is None, gateway.log()[-3000:]
    except grpc.RpcError as error:
        raise AssertionError(f"seed Embed failed: {error}\n{gateway.log()[-3000:]}") from None
    finally:
        code = gateway.stop()
    assert code == 0, f"gateway exit code {code}\n{gateway.log()[-3000:]}"
