"""Start and stop the real ``tritonserver`` binary shipped in the PyPI wheel ``nvidia-pytriton``.

One launcher for ``make up``, the test fixtures and the benchmarks. Triton runs the python-backend models with
the Python environment it inherits, so it is started from this (virtual) environment: the backend stub for the
running Python version, this interpreter's ``libpython`` and ``nvidia_pytriton.libs`` on the library path.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import logging
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import tritonclient.grpc as grpcclient

from samserve.launch.subprocesses import terminate

LOG = logging.getLogger(__name__)


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready in time; the message carries the end of its log."""


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed: `pip install nvidia-pytriton` ships tritonserver")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    return _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def prepare_backend_dir(workdir: Path) -> Path:
    """A ``--backend-directory`` whose ``python/`` holds the backend library and this Python's stub."""
    triton = _pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton has no python backend stub for Python {version}")
    _require_libpython(version)
    backend = Path(workdir) / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (triton / "backends" / "python").iterdir():
        if source.is_file():
            _symlink(source, backend / source.name)
    _symlink(stub, backend / "triton_python_backend_stub")
    return backend.parent


def prepare_server_dir(workdir: Path) -> Path:
    """``workdir/bin/tritonserver`` (a link to the wheel's binary, at a path that names no Python version) beside
    the ``--backend-directory`` ``workdir/backends`` of :func:`prepare_backend_dir`; returns the link. The Triton
    image's entry point runs it."""
    prepare_backend_dir(workdir)
    link = Path(workdir) / "bin" / "tritonserver"
    link.parent.mkdir(parents=True, exist_ok=True)
    _symlink(tritonserver_binary(), link)
    return link


def _require_libpython(version: str) -> None:
    """The stub links against ``libpython<version>.so.1.0``: this interpreter's, or the system's."""
    name = f"libpython{version}.so.1.0"
    if (Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / name).exists():
        return
    if ctypes.util.find_library(f"python{version}"):
        return
    raise TritonStartError(
        f"Triton's python backend stub needs {name}: use a Python built with --enable-shared "
        f"or install Debian's libpython{version}"
    )


def _symlink(source: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == source:
            return
        link.unlink()
    link.symlink_to(source)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = [
        str(_pytriton_dir().parent / "nvidia_pytriton.libs"),
        sysconfig.get_config_var("LIBDIR") or "",  # this interpreter's libpython, for the stub
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*filter(None, libs), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


class TritonServer:
    """A running ``tritonserver`` process (use :func:`running_triton` or ``start``/``stop``)."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.log_path = self.workdir / "logs" / f"tritonserver-{grpc_port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={prepare_backend_dir(self.workdir)}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the process; its log goes to :attr:`log_path`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        output = open(self.log_path, "wb")
        LOG.info("starting tritonserver on %s (repository %s)", self.grpc_url, self.repository)
        self.process = subprocess.Popen(self.command(), env=_environment(), stdout=output, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float, models: Sequence[str] = ()) -> None:
        """Block until the server and ``models`` are ready; raise TritonStartError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise TritonStartError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        return
                time.sleep(0.25)
        finally:
            client.close()
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log written)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL after ``timeout_s``."""
        terminate(self.process, timeout_s, "tritonserver")


@contextlib.contextmanager
def running_triton(server: TritonServer, timeout_s: float, models: Sequence[str]) -> Iterator[TritonServer]:
    """Start ``server``, wait for ``models``, and always stop it on exit."""
    server.start()
    try:
        server.wait_ready(timeout_s, models)
        yield server
    finally:
        server.stop()
