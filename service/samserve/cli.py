"""``samserve``: run the stack.

    samserve up       # Triton on the rendered repository (SAMSERVE_WORKDIR/repository), in the foreground
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from samserve import model_spec
from samserve.settings import Settings
from samserve.triton_server import TritonServer, TritonStartError

LOG = logging.getLogger("samserve")


def up(settings: Settings) -> int:
    """Start Triton with the prepared repository and keep it in the foreground until SIGINT/SIGTERM."""
    repository = settings.workdir / "repository"
    if not (repository / model_spec.ENCODER_MODEL / "config.pbtxt").exists():
        LOG.error("no model repository at %s: run `samserve-build prepare` (or `make up`) first", repository)
        return 2
    server = TritonServer(
        repository=repository,
        workdir=settings.workdir,
        http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port,
        host=settings.triton_host,
        log_verbose=settings.triton_log_verbose,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    try:
        server.wait_ready(settings.triton_start_timeout_s, (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL))
        LOG.info(
            "ready: Triton gRPC %s, HTTP %s:%d, metrics %s:%d/metrics (log: %s); Ctrl-C stops",
            server.grpc_url, settings.triton_host, settings.triton_http_port,
            settings.triton_host, settings.triton_metrics_port, server.log_path,
        )
        while not stop.wait(1.0):
            if server.process is not None and server.process.poll() is not None:
                LOG.error("tritonserver exited with %s:\n%s", server.process.returncode, server.log_tail())
                return 1
    except TritonStartError as error:
        LOG.error("%s", error)
        return 1
    finally:
        LOG.info("stopping")
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the stack in the foreground")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "up":
        return up(Settings())
    return 2


if __name__ == "__main__":
    sys.exit(main())
