"""One host of the multi-host test, run inside its network namespace by :class:`tests.support.netns.Network`
(``ip netns exec NS python -m tests.support.netns_host ROLE ...``): the real processes that host runs, on its
loopback, and a delaying relay (:mod:`tests.support.delay_relay`) that is the only way in from the other hosts.

* ``redis``: redis-server; the relay serves it on ``--address``:6379.
* ``pod``: Triton (the exported model in ``--model-dir``) and a gateway with the shared-memory transport, as a pod
  of the chart's sidecar profile runs them; the relay serves the gateway on ``--address``:50051 and Triton's gRPC
  port (for its statistics) on ``--address``:8001.

Prints one line ``READY {json}`` once serving, then runs until SIGTERM (stops everything) or until the whole
namespace is killed (a pod dying: nothing is stopped cleanly)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from samserve import model_spec, triton_server
from samserve.redis_server import RedisServer
from samserve_build.repository import write_repository
from tests.support import delay_relay
from tests.support.local_stack import GatewayProcess, free_port

LOOPBACK = "127.0.0.1"
REDIS_PORT = 6379
GATEWAY_PORT = 50051
TRITON_GRPC_PORT = 8001
TRITON_START_TIMEOUT_S = 300.0


async def _relay_until_terminated(links: list[delay_relay.Link], ready: dict[str, object]) -> None:
    servers = [await delay_relay.start(link) for link in links]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY " + json.dumps(ready), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


@contextlib.contextmanager
def _redis(args: argparse.Namespace) -> Iterator[list[delay_relay.Link]]:
    server = RedisServer(free_port(), Path(args.workdir)).start()
    try:
        yield [delay_relay.Link((args.address, REDIS_PORT), (LOOPBACK, server.port), args.delay_s)]
    finally:
        server.stop()


@contextlib.contextmanager
def _pod(args: argparse.Namespace) -> Iterator[list[delay_relay.Link]]:
    workdir = Path(args.workdir)
    repository = write_repository(Path(args.model_dir), workdir / "repository")
    triton = triton_server.TritonServer(repository, workdir / "triton", free_port(), free_port(), free_port())
    with triton_server.running_triton(triton, TRITON_START_TIMEOUT_S,
                                      (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)):
        with GatewayProcess(triton.grpc_url, args.redis_url, workdir, embedding_transport="shm") as gateway:
            yield [delay_relay.Link((args.address, GATEWAY_PORT), (LOOPBACK, gateway.port), args.delay_s),
                   delay_relay.Link((args.address, TRITON_GRPC_PORT), (LOOPBACK, triton.grpc_port), args.delay_s)]


ROLES = {"redis": _redis, "pod": _pod}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--address", required=True, help="this namespace's address on the bridge")
    parser.add_argument("--delay-s", type=float, required=True, help="added to every byte, each direction")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model-dir", help="pod: the exported model")
    parser.add_argument("--redis-url", help="pod: the Redis host, through its relay")
    args = parser.parse_args(argv)
    with ROLES[args.role](args) as links:
        asyncio.run(_relay_until_terminated(links, {"address": args.address}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
