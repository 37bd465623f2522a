"""The committed locustfile (bench/locustfile.py) run headless against a gateway, as the load smoke tests do."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_headless(target: str, folder: Path, scenario: str, run_time_s: int = 10, users: int = 4,
                 **env: str) -> dict[str, dict[str, str]]:
    """Run the ``scenario`` user class for ``run_time_s`` (small generated images; ``env`` adds variables such as
    SAMSERVE_CLIENT_*); Locust's stats rows by name ("Aggregated" for all). Asserts that Locust exited 0 (it does
    not when a call failed)."""
    prefix = folder / "locust"
    variables = dict(os.environ, SAMSERVE_LOAD_HEIGHT="120", SAMSERVE_LOAD_WIDTH="160",
                     SAMSERVE_LOAD_POINTS_PER_SIDE="8", **env)
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "bench" / "locustfile.py"),
         "--headless", "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{run_time_s}s",
         "--host", target, "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "1", scenario],
        capture_output=True, text=True, timeout=120 + run_time_s, env=variables, cwd=folder,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}
