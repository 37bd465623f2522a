"""A local stack for tests and benchmarks: Triton on a rendered repository and gateway processes, on free
loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from samserve.core import model_spec
from samserve.core.settings import ClientSettings
from samserve.launch import triton_server
from samserve.launch.subprocesses import terminate
from samserve.security.tls import client_channel
from samserve_build.repository import write_repository


def free_port() -> int:
    """A free TCP port on loopback (tests and benchmarks run their own Triton)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_locally(model_dir: Path, root: Path, timeout_s: float = 300.0,
                  **repository_options: Any) -> Iterator[triton_server.TritonServer]:
    """Render a repository for ``model_dir`` under ``root`` (``repository_options``: those of
    :func:`write_repository`, e.g. another target) and run Triton on free loopback ports until exit."""
    repo = write_repository(model_dir, Path(root) / "repository", **repository_options)
    with serve_repository(repo, root, timeout_s) as server:
        yield server


@contextlib.contextmanager
def serve_repository(repo: Path, root: Path, timeout_s: float = 300.0,
                     models: Sequence[str] = (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL),
                     extra_args: Sequence[str] = ()) -> Iterator[triton_server.TritonServer]:
    """Run Triton on the repository ``repo`` on free loopback ports until exit, once ``models`` are ready."""
    server = triton_server.TritonServer(repo, Path(root) / "work", free_port(), free_port(), free_port(),
                                        extra_args=extra_args)
    with triton_server.running_triton(server, timeout_s, models):
        yield server


class GatewayProcess:
    """`samserve gateway` as a real process on a free port (settings through SAMSERVE_* variables). Auth is off
    unless ``settings`` say otherwise (a test stack on loopback); ``client``: how this helper's own channels (the
    health checks) reach it, e.g. over TLS. ``on_spawn``: called with the process id right after every start, before
    the gateway imports anything (e.g. to put it in a memory-limited cgroup)."""

    def __init__(self, triton_url: str, redis_url: str | None, workdir: Path, client: ClientSettings | None = None,
                 on_spawn: Callable[[int], None] | None = None, **settings: object) -> None:
        host, port = triton_url.rsplit(":", 1)
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.env = dict(
            os.environ,
            SAMSERVE_WORKDIR=str(workdir),
            SAMSERVE_GATEWAY_PORT=str(self.port),
            SAMSERVE_METRICS_PORT=str(self.metrics_port),
            SAMSERVE_HTTP_PORT=str(self.http_port),
            SAMSERVE_TRITON_HOST=host,
            SAMSERVE_TRITON_GRPC_PORT=port,
            SAMSERVE_HEALTH_CHECK_INTERVAL_S="0.2",
            SAMSERVE_FAILURE_LOG_INTERVAL_S="0",
            SAMSERVE_AUTH="off",
        )
        if redis_url:
            self.env["SAMSERVE_REDIS_URL"] = redis_url
        self.env.update({f"SAMSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.client = client
        self.on_spawn = on_spawn
        self.log_path = Path(workdir) / f"gateway-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP/JSON API (plaintext; a TLS gateway serves it over https)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, wait_serving: bool = True, timeout_s: float = 60.0) -> GatewayProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "samserve"), "gateway"], env=self.env,
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )
        if self.on_spawn is not None:
            self.on_spawn(self.process.pid)
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

        with self.channel() as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
            except grpc.RpcError:
                return None
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def channel(self) -> grpc.Channel:
        """A new blocking channel to the gateway, secured as :attr:`client` says."""
        return client_channel(self.target, **(self.client.model_dump() if self.client else {}))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM (the gateway drains), then SIGKILL after 30 s; the exit code."""
        code = terminate(self.process, 30.0, "gateway")
        return 0 if code is None else code

    def __enter__(self) -> GatewayProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
