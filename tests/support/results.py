"""Results files written by test tiers (the e2e tier's images_cpu.json and pods_cpu.json): the same folder, format
and environment block as the benchmarks' (bench/common.py), with the command that made them."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from bench.common import RESULTS, cpu, git_commit, write_results


def write_e2e_results(name: str, payload: dict, command: str = "make e2e") -> Path:
    """``payload`` plus the environment (date, commit, CPU, Python) as bench/results/``name``."""
    processor = cpu()
    payload = {**payload, "environment": {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command,
        "machine": f"{processor['model']}, {processor['cores']} cores, no GPU",
        "cpu": processor,
        "python": sys.version.split()[0],
    }}
    return write_results(name, payload, RESULTS)
