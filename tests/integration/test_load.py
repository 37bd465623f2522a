"""Locust smoke: the committed locustfile, headless for ~10 s against a real stack; zero failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]



EXPECTED_CALL = {"MixedUser": "Segment hot (image_id)", "EverythingUser": "GenerateMasks (image_id)"}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_CALL))
def test_locust_headless_has_no_failures(gateway, tmp_path, scenario):
    prefix = tmp_path / "locust"
    env = dict(os.environ, SAMSERVE_LOAD_HEIGHT="120", SAMSERVE_LOAD_WIDTH="160", SAMSERVE_LOAD_POINTS_PER_SIDE="8")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", str(REPO_ROOT / "bench" / "locustfile.py"),
         "--headless", "--users", "4", "--spawn-rate", "4", "--run-time", "10s", "--host", gateway.target,
         "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "1", scenario],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert int(rows[EXPECTED_CALL[scenario]]["Request Count"]) > 0
