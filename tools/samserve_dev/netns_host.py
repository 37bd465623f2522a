"""One host of the multi-host test, run inside its network namespace by :class:`samserve_dev.netns.Network`
(``ip netns exec NS python -m samserve_dev.netns_host ROLE ...``): the real processes that host runs, on its
loopback, and a delaying relay (:mod:`samserve_dev.delay_relay`) that is the only way in from the other hosts.

* ``redis``: redis-server; the relay serves it on ``--address``:6379.
* ``pod``: Triton (the exported model in ``--model-dir``) and a gateway with the shared-memory transport, as a pod
  of the chart's sidecar profile runs them (``--gateway-settings``: more of its settings, a JSON object); the relay
  serves the gateway on ``--address``:50051 and Triton's gRPC port (for its statistics, or a gateway elsewhere) on
  ``--address``:8001.
* ``dns``: a DNS server on ``--address``:53 (UDP, not delayed), as a cluster's DNS serves a headless Service: it
  answers A queries with the addresses the ``--records`` file (:func:`write_records`) names at the moment of the
  query (TTL 0, so no resolver caches them), AAAA queries of those names with no address, any other name NXDOMAIN.

Prints one line ``READY {json}`` once serving, then runs until SIGTERM (stops everything) or until the whole
namespace is killed (a pod dying: nothing is stopped cleanly)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socketserver
import struct
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from samserve.core import model_spec
from samserve.launch import triton_server
from samserve.launch.redis_server import RedisServer
from samserve_build.repository import write_repository
from samserve_dev import delay_relay
from samserve_dev.local_stack import GatewayProcess, free_port

LOOPBACK = "127.0.0.1"
REDIS_PORT = 6379
GATEWAY_PORT = 50051
TRITON_GRPC_PORT = 8001
TRITON_START_TIMEOUT_S = 300.0
DNS_PORT = 53


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
        settings = json.loads(args.gateway_settings or "{}")
        with GatewayProcess(triton.grpc_url, args.redis_url, workdir, embedding_transport="shm",
                            **settings) as gateway:
            yield [delay_relay.Link((args.address, GATEWAY_PORT), (LOOPBACK, gateway.port), args.delay_s),
                   delay_relay.Link((args.address, TRITON_GRPC_PORT), (LOOPBACK, triton.grpc_port), args.delay_s)]


def write_records(path: Path, records: Mapping[str, Sequence[str]]) -> None:
    """Replace the DNS host's records at once (a reader sees the old file or the new one): name -> IPv4 addresses."""
    staged = path.with_suffix(".staged")
    staged.write_text(json.dumps({name.lower().rstrip("."): list(addresses) for name, addresses in records.items()}))
    os.replace(staged, path)


_TYPE_A, _TYPE_AAAA, _CLASS_IN = 1, 28, 1
_NXDOMAIN = 3


def dns_answer(query: bytes, records: Mapping[str, Sequence[str]]) -> bytes:
    """The response to one DNS query message (RFC 1035 section 4): A records of a known name, none for its other
    types, NXDOMAIN for other names. Additional records of the query (EDNS) are ignored."""
    ident, flags = struct.unpack("!HH", query[:4])
    labels, position = [], 12
    while length := query[position]:
        labels.append(query[position + 1:position + 1 + length].decode("ascii"))
        position += 1 + length
    qtype, qclass = struct.unpack("!HH", query[position + 1:position + 5])
    question = query[12:position + 5]
    addresses = records.get(".".join(labels).lower())
    answers = [] if addresses is None or (qtype, qclass) != (_TYPE_A, _CLASS_IN) else addresses
    header = struct.pack("!HHHHHH", ident, 0x8400 | (flags & 0x0100) | (_NXDOMAIN if addresses is None else 0),
                         1, len(answers), 0, 0)  # a response, authoritative, recursion desired as asked
    # Each answer names the question's name by a pointer to offset 12, class IN, TTL 0, 4 bytes of address.
    return header + question + b"".join(struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, 0, 4)
                                        + ipaddress.IPv4Address(address).packed for address in answers)


@contextlib.contextmanager
def _dns(args: argparse.Namespace) -> Iterator[list[delay_relay.Link]]:
    records_path = Path(args.records)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            query, sock = self.request
            sock.sendto(dns_answer(query, json.loads(records_path.read_text())), self.client_address)

    server = socketserver.UDPServer((args.address, DNS_PORT), Handler)
    serving = threading.Thread(target=server.serve_forever, name="dns")
    serving.start()
    try:
        yield []
    finally:
        server.shutdown()
        serving.join()
        server.server_close()


ROLES = {"redis": _redis, "pod": _pod, "dns": _dns}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--address", required=True, help="this namespace's address on the bridge")
    parser.add_argument("--delay-s", type=float, required=True, help="added to every byte, each direction")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model-dir", help="pod: the exported model")
    parser.add_argument("--redis-url", help="pod: the Redis host, through its relay")
    parser.add_argument("--gateway-settings", help="pod: more SAMSERVE_* settings of its gateway, a JSON object")
    parser.add_argument("--records", help="dns: the records file (write_records)")
    args = parser.parse_args(argv)
    with ROLES[args.role](args) as links:
        asyncio.run(_relay_until_terminated(links, {"address": args.address}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
