"""The fuzz tier's fixtures: the integration tier's real Triton (``tiny`` model, seeded random weights) and real Redis,
and one real `samserve gateway` process that every fuzz test of the session sends its hostile requests to (auth
off). Every test under tests/fuzz is marked ``fuzz``; the replay of the committed corpus and regressions runs before
the other fuzz tests. The generation budget is ``SAMSERVE_FUZZ_SECONDS`` (:mod:`tests.fuzz.harness`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from samserve.core.api import SERVICE_NAME, pb
from samserve.launch.redis_server import RedisServer
from samserve_dev.local_stack import GatewayProcess
from samserve_dev.served_models import ServedModel
from tests.fuzz.harness import SEED_IMAGE_HW, FuzzTarget
from tests.fuzz.strategies import corpus_path
from tests.integration.conftest import TRACER_WARNINGS, redis_server, tiny_model, tiny_triton  # noqa: F401

HERE = Path(__file__).parent
REPLAY_FIRST = "test_replay.py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: hypothesis fuzzing of the real gateway (every test under tests/fuzz)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [k for k, item in enumerate(items) if item.path.is_relative_to(HERE)]
    for k in ours:
        items[k].add_marker(pytest.mark.fuzz)
        items[k].add_marker(TRACER_WARNINGS)  # the tiny model's export traces the official modules
    # Within the tier's own positions (other tiers keep theirs): the committed cases first (a stable sort).
    replay_first = sorted((items[k] for k in ours), key=lambda item: item.path.name != REPLAY_FIRST)
    for k, item in zip(ours, replay_first, strict=True):
        items[k] = item


def _embed_seed(channel: grpc.Channel) -> str:
    """Embed tests/fuzz/corpus/seed.png; its image id."""
    embed = channel.unary_unary(f"/{SERVICE_NAME}/Embed")
    answer = pb.EmbedResponse.FromString(
        embed(pb.EmbedRequest(image=corpus_path("seed.png").read_bytes()).SerializeToString(), timeout=60))
    assert (answer.height, answer.width) == SEED_IMAGE_HW
    return answer.image_id


@pytest.fixture(scope="session")
def fuzz_target(tiny_triton: ServedModel, redis_server: RedisServer,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """The gateway under fuzz, with the seed image embedded; after the session it must still be alive and exit
    cleanly on SIGTERM."""
    gateway = GatewayProcess(tiny_triton.url, redis_server.url, tmp_path_factory.mktemp("fuzz-gateway")).start()
    try:
        # Plaintext like the gateway; no client-side receive limit, so RESOURCE_EXHAUSTED is always the server's.
        with grpc.insecure_channel(gateway.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            yield FuzzTarget(gateway, channel, _embed_seed(channel))
        assert gateway.process is not None and gateway.process.poll() is None, gateway.log()[-3000:]
    finally:
        code = gateway.stop()
    assert code == 0, f"gateway exit code {code}\n{gateway.log()[-3000:]}"
