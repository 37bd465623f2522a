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


@pytest.mark.parametrize(("before", "after"), [
    ("def f(x: int) -> int:\n    return x + 1\n", "def f(x: float) -> float:\n    return x + 1  # a comment\n"),
    ("def f(x):\n    return x\n", 'def f(x):\n    """Now documented."""\n    return x\n'),
    ("LIMIT = 3\n", "LIMIT: int = 3\n"),
    ("def f():\n    y = []\n    return y\n", "def f():\n    y: list[int] = []\n    return y\n"),
])
def test_comments_docstrings_and_annotations_leave_results_fresh(repo: Path, before: str, after: str) -> None:
    commit_file(repo, "code/measured.py", before)
    record(repo, git(repo, "rev-parse", "HEAD"))
    commit_file(repo, "code/measured.py", after)
    commit_file(repo, "code/README.md", "docs beside the code")
    checked = freshness.check(repo, "r.json", ("code",))
    assert checked.state == "fresh" and "only comments" in checked.why


@pytest.mark.parametrize(("before", "after"), [
    ("def f(x):\n    return x + 1\n", "def f(x):\n    return x + 2\n"),
    ("import dataclasses\n@dataclasses.dataclass\nclass C:\n    x: int\n",
     "import dataclasses\n@dataclasses.dataclass\nclass C:\n    x: int\n    y: int = 0\n"),  # a new field
    ("class S:\n    x: int = 1\n", "class S:\n    x: float = 1\n"),  # pydantic fields validate by annotation
])
def test_a_code_change_makes_results_stale(repo: Path, before: str, after: str) -> None:
    commit_file(repo, "code/measured.py", before)
    record(repo, git(repo, "rev-parse", "HEAD"))
    commit_file(repo, "code/measured.py", after)
    checked = freshness.check(repo, "r.json", ("code",))
    assert checked.state == "stale" and "code/measured.py" in checked.why


def test_every_benchmark_depends_on_the_bench_modules_it_imports() -> None:
    """A benchmark's figures depend on the bench modules it imports (e.g. amg_cpu.py's amg_figures.py)."""
    import ast

    for name, paths in freshness.MEASURES.items():
        script = ROOT / paths[0]
        if not paths[0].startswith("bench/"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bench":
                imported |= {f"bench/{alias.name}.py" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
                imported.add(node.module.replace(".", "/") + ".py")
        assert imported <= set(paths), f"{name}: add {sorted(imported - set(paths))} to MEASURES"


def test_code_no_benchmark_runs_leaves_results_fresh(repo: Path) -> None:
    """The Label Studio backend sits under service/samserve (a measured path) but no benchmark runs it."""
    commit_file(repo, "service/samserve/core/api.py", "v1")
    record(repo, git(repo, "rev-parse", "HEAD"))
    for path in freshness.NOT_MEASURED:
        commit_file(repo, path if path.endswith(".py") else f"{path}/app.py", "anything")
    assert freshness.check(repo, "r.json", ("service/samserve",)).state == "fresh"
    commit_file(repo, "service/samserve/core/api.py", "v2")
    assert freshness.check(repo, "r.json", ("service/samserve",)).state == "stale"


def test_make_bench_runs_the_benchmarks_of_the_files_not_fresh_in_the_given_order() -> None:
    def item(results_file: str, state: str) -> freshness.Freshness:
        return freshness.Freshness(results_file, state, "", "")

    report = [item("amg_cpu.json", "stale"), item("soak_cpu.json", "unknown"), item("models_cpu.json", "fresh"),
              item("tiny_quality.json", "stale"), item("pods_cpu.json", "stale")]
    order = ["models_cpu", "soak", "quality_cpu", "amg_cpu"]
    assert freshness.stale_benchmarks(report, order) == ["soak", "quality_cpu", "amg_cpu"]
