"""Start and stop Debian's ``redis-server`` on loopback (the stack's tier-2 cache; test fixtures use it too)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from samserve.launch.subprocesses import terminate


class RedisStartError(RuntimeError):
    """redis-server is missing, exited, or did not answer PING in time."""


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@dataclasses.dataclass(frozen=True)
class RedisTls:
    """PEM files of a TLS-only redis-server: its certificate and key, and the CA that signed it (what clients
    trust; the server also accepts client certificates it signed, which clients may present or not)."""

    cert: Path
    key: Path
    ca: Path


class RedisServer:
    """A throw-away redis-server: no persistence, bound to ``host``:``port``, data under ``workdir``; optionally
    with a password (``requirepass``) and TLS only (``rediss://``)."""

    def __init__(self, port: int, workdir: Path, host: str = "127.0.0.1", extra_args: tuple[str, ...] = (),
                 password: str | None = None, tls: RedisTls | None = None) -> None:
        self.host, self.port = host, port
        self.workdir = Path(workdir)
        self.extra_args = extra_args
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def _arguments(self) -> list[str]:
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                      "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                      "--tls-auth-clients", "optional"]
        return [*listen, *(["--requirepass", self.password] if self.password else [])]

    def client(self, **options: object) -> redis.Redis:
        """A blocking client with this server's password and TLS."""
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis(host=self.host, port=self.port, password=self.password, **tls, **options)  # type: ignore[arg-type]

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        binary = redis_binary()
        if binary is None:
            raise RedisStartError("redis-server not found: install Debian's redis-server (make does, as root)")
        # One try per probe: redis-py's default retries with backoff cost seconds on a port nobody answers yet.
        client = self.client(socket_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            client.ping()
            raise RedisStartError(f"something already answers on {self.host}:{self.port}; choose another port "
                                  "or point SAMSERVE_REDIS_URL at that Redis")
        except (redis.ConnectionError, redis.AuthenticationError):
            pass  # the port is free
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [binary, "--bind", self.host, *self._arguments(), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisStartError(f"redis-server exited with {self.process.returncode}")
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RedisStartError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def stop(self) -> None:
        terminate(self.process, 10.0, "redis-server")
