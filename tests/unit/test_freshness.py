"""bench/freshness.py: a results file is flagged when a later commit changed what it measures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import freshness

ROOT = Path(__file__).resolve().parents[2]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit_file(repo: Path, name: str, text: str) -> str:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"change {name}")
    return git(repo, "rev-parse", "HEAD")


def record(repo: Path, commit: str) -> None:
    """A benchmark's results file, committed after the run as a benchmark's results are."""
    commit_file(repo, "bench/results/r.json", json.dumps({"environment": {"commit": commit}}))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    commit_file(tmp_path, "code/measured.py", "v1")
    return tmp_path


def state(repo: Path) -> freshness.Freshness:
    return freshness.check(repo, "r.json", ("code/measured.py",))


def test_fresh_until_the_measured_code_changes(repo: Path) -> None:
    record(repo, git(repo, "rev-parse", "HEAD"))
    assert state(repo).state == "fresh"
    commit_file(repo, "code/other.py", "unrelated")
    assert state(repo).state == "fresh"
    commit_file(repo, "code/measured.py", "v2")
    flagged = state(repo)
    assert flagged.state == "stale" and "change code/measured.py" in flagged.why


def test_uncommitted_or_unknown_commits_are_not_fresh(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    record(repo, head + "-dirty")
    assert state(repo).state == "stale"
    record(repo, "0" * 40)
    assert state(repo).state == "unknown"
    commit_file(repo, "bench/results/r.json", json.dumps({"seconds": 1}))  # no environment at all
    assert state(repo).state == "unknown"
    assert freshness.check(repo, "missing.json", ("code",)).state == "unknown"


def test_every_results_file_says_what_it_measures() -> None:
    results = {path.name for path in (ROOT / freshness.RESULTS).glob("*.json")}
    assert results == set(freshness.MEASURES), "add the file to bench/freshness.MEASURES (or remove it)"
    missing = {path for paths in freshness.MEASURES.values() for path in paths if not (ROOT / path).exists()}
    assert not missing, f"MEASURES names paths that do not exist: {missing}"
