"""Stopping the child processes the stack starts (Triton, Redis, gateways)."""

from __future__ import annotations

import logging
import signal
import subprocess

LOG = logging.getLogger(__name__)


def terminate(process: subprocess.Popen | None, timeout_s: float, name: str = "process") -> int | None:
    """SIGTERM (a graceful stop), then SIGKILL after ``timeout_s``; returns the exit code (None if never started)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            LOG.warning("%s did not stop in %.0f s; killing it", name, timeout_s)
            process.kill()
            process.wait()
    return process.returncode
