"""``samserve up`` (Redis, Triton and the gateway in the foreground) and ``samserve gateway`` (the gateway alone)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from samserve.core import model_spec
from samserve.core.settings import GatewaySettings, StackSettings
from samserve.launch.redis_server import RedisServer, RedisStartError, redis_binary
from samserve.launch.triton_server import TritonServer, TritonStartError
from samserve.security.loader import Security, SecurityConfigError, load_security
from samserve.transport.grpc_server import serve

LOG = logging.getLogger("samserve")


def _security(settings: GatewaySettings) -> Security | None:
    """The checked security settings, or None after logging why they are unusable."""
    try:
        return load_security(settings)
    except SecurityConfigError as error:
        LOG.error("invalid security settings: %s", error)
        return None


async def _serve_until_signal(settings: GatewaySettings, security: Security, watch: object | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM (or until the watched subprocess exits)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def watch_process() -> None:
        while watch is not None and watch.poll() is None:  # type: ignore[attr-defined]
            await asyncio.sleep(1.0)
        if watch is not None:
            LOG.error("tritonserver exited with %s", watch.returncode)  # type: ignore[attr-defined]
            stop.set()

    watcher = asyncio.create_task(watch_process())
    try:
        await serve(settings, stop, security)
    finally:
        watcher.cancel()


def up(settings: StackSettings, args: argparse.Namespace | None = None) -> int:
    """Redis (if Debian's redis-server is installed and no SAMSERVE_REDIS_URL is set), Triton, gateway."""
    repository = settings.repository
    if not (repository / model_spec.ENCODER_MODEL / "config.pbtxt").exists():
        LOG.error("no model repository at %s: run `samserve-build prepare` (or `make up`) first", repository)
        return 2
    security = _security(settings)
    if security is None:
        return 2
    decoder_dir = repository / model_spec.DECODER_MODEL / "1"
    if settings.client_decoder_dir is None and (decoder_dir / model_spec.DECODER_FILE).exists():
        settings = settings.model_copy(update={"client_decoder_dir": decoder_dir})  # browsers decode with it
    redis = None
    if settings.redis_url is None and redis_binary() is not None:
        try:
            redis = RedisServer(settings.redis_server_port, settings.workdir / "redis").start()
        except RedisStartError as error:
            LOG.error("%s", error)
            return 1
        settings = settings.model_copy(update={"redis_url": redis.url})
        LOG.info("redis-server on %s (embedding cache tier 2)", redis.url)
    triton = TritonServer(
        repository=repository, workdir=settings.workdir, http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port, metrics_port=settings.triton_metrics_port,
        host=settings.triton_host, log_verbose=settings.triton_log_verbose,
    )
    try:
        triton.start()
        triton.wait_ready(settings.triton_start_timeout_s, (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL))
        LOG.info("Triton ready on %s (log %s); starting the gateway on %s:%d; Ctrl-C stops everything",
                 triton.grpc_url, triton.log_path, settings.gateway_host, settings.gateway_port)
        asyncio.run(_serve_until_signal(settings, security, triton.process))
    except TritonStartError as error:
        LOG.error("%s", error)
        return 1
    finally:
        LOG.info("stopping")
        triton.stop()
        if redis is not None:
            redis.stop()
    return 0


def gateway_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """The gateway alone (Triton and Redis elsewhere): one per replica."""
    security = _security(settings)
    if security is None:
        return 2
    asyncio.run(_serve_until_signal(settings, security))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``up`` and ``gateway`` to the ``samserve`` parser."""
    commands.add_parser("up", help="run Redis + Triton + gateway in the foreground").set_defaults(
        run=up, settings=StackSettings)
    commands.add_parser("gateway", help="run the gateway alone (SAMSERVE_TRITON_*, SAMSERVE_REDIS_URL)").set_defaults(
        run=gateway_command, settings=GatewaySettings)
