"""Which results files are stale: measured at a commit older than the code they measure.

Every results file records the commit it ran on (``environment.commit``; ``-dirty`` when tracked code differed
from that commit). :data:`MEASURES` says, per results file, which paths of the repository its figures depend on:
the benchmark script, the shared benchmark plumbing, and the code it times. A file is

* ``fresh`` when no commit after its own touched any of those paths,
* ``stale`` when one did (the commits are listed), or when it ran on uncommitted changes (``-dirty``),
* ``unknown`` when it records no commit, or one that is not in this repository's history.

``make bench-status`` prints the table and exits 1 when a file is not fresh; ``make bench`` regenerates them all.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("bench/results")

SERVING_PATH = ("service/samserve", "build/samserve_build/export.py", "build/samserve_build/graphs.py",
                "build/samserve_build/repository.py", "build/samserve_build/targets.py",
                "build/samserve_build/architectures.py", "model_repository/cpu-onnxruntime")
"""What every benchmark of the served models measures: the service, the exported graphs and their Triton configs
(the cpu-onnxruntime target's: the CPU benchmarks serve no other)."""
PLUMBING = ("bench/common.py", "tools/samserve_dev")
CPU_RUNTIMES = ("service/samserve/backends/onnx_runner.py", "service/samserve/backends/openvino_runner.py",
                "service/samserve/backends/python_model.py", "build/samserve_build/targets.py",
                "build/samserve_build/cpu_choice.py", "build/samserve_build/graph_quality.py",
                "build/samserve_build/repository.py", "model_repository/cpu-onnxruntime",
                "model_repository/cpu-openvino")
"""The CPU targets' runners as :meth:`samserve_build.graph_quality.OnnxSam.of_target` loads them, and auto's choice."""

MEASURES: dict[str, tuple[str, ...]] = {
    "backends_cpu.json": ("bench/backends_cpu.py", *PLUMBING, *CPU_RUNTIMES, "service/samserve/vision/processing.py",
                          "service/samserve/core/model_spec.py",
                          "build/samserve_build/export.py", "build/samserve_build/graphs.py",
                          "build/samserve_build/architectures.py"),
    "models_cpu.json": ("bench/models_cpu.py", *PLUMBING, *SERVING_PATH, *CPU_RUNTIMES),
    "gateway_cpu.json": ("bench/gateway_cpu.py", *PLUMBING, *SERVING_PATH),
    "throughput_cpu.json": ("bench/throughput_cpu.py", *PLUMBING, *SERVING_PATH),
    "amg_cpu.json": ("bench/amg_cpu.py", *PLUMBING, *SERVING_PATH, "build/checkpoints/samserve_scenes_v1.pth"),
    "export_cpu.json": ("bench/export_cpu.py", "bench/common.py", "build/samserve_build/export.py",
                        "build/samserve_build/graphs.py",
                        "build/samserve_build/architectures.py", "service/samserve/core/model_spec.py"),
    "request_memory_cpu.json": ("bench/request_memory_cpu.py", "bench/amg_cpu.py", *PLUMBING, *SERVING_PATH,
                                "build/checkpoints/samserve_scenes_v1.pth"),
    "soak_cpu.json": ("bench/soak.py", *PLUMBING, *SERVING_PATH, "build/checkpoints/samserve_scenes_v1.pth"),
    "browser_cpu.json": ("bench/browser_cpu.py", *PLUMBING, *SERVING_PATH, "web/src", "web/package-lock.json",
                         "web/demo.png", "build/checkpoints/samserve_scenes_v1.pth"),
    "multihost_cpu.json": ("bench/multihost_cpu.py", *PLUMBING, *SERVING_PATH),
    "precision_cpu.json": ("bench/precision_cpu.py", "bench/amg_cpu.py", *PLUMBING, "build/samserve_build/precision",
                           "build/samserve_build/graph_quality.py", "build/samserve_build/export.py",
                           "build/samserve_build/graphs.py",
                           "build/samserve_build/architectures.py", "build/samserve_build/evaluation.py",
                           "build/samserve_build/scenes.py", *CPU_RUNTIMES,
                           "service/samserve/vision/processing.py", "service/samserve/core/model_spec.py",
                           "build/checkpoints/samserve_scenes_v1.pth"),
    "images_cpu.json": ("tests/e2e/conftest.py", "tools/samserve_dev/containers.py", "bench/common.py",
                        "tests/e2e/containers.conf", "deploy/docker", ".dockerignore", "pyproject.toml", "setup.py",
                        "web/package-lock.json"),
    "pods_cpu.json": ("tests/e2e/test_pods.py", "tools/samserve_dev/kube_play.py", "tools/samserve_dev/containers.py",
                      "tools/samserve_dev/locust.py", "bench/locustfile.py", "deploy/docker", "deploy/helm/samserve",
                      "deploy/helm/profiles/cpu.yaml", *SERVING_PATH, "build/samserve_build/cli.py",
                      "build/samserve_build/workdir.py", "build/checkpoints/samserve_scenes_v1.pth"),
    "tiny_quality.json": ("bench/quality_cpu.py", "bench/common.py", "build/samserve_build/evaluation.py",
                          "build/samserve_build/scenes.py", "build/samserve_build/clicks.py",
                          "build/checkpoints/samserve_scenes_v1.pth"),
}
"""Results file (in bench/results) -> the repository paths its figures depend on."""


@dataclasses.dataclass(frozen=True)
class Freshness:
    results_file: str
    state: str
    """``fresh``, ``stale`` or ``unknown``."""
    commit: str
    """The commit the file records (``-dirty`` included), or ``""``."""
    why: str


def git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def recorded_commit(results: dict) -> str:
    return str(results.get("environment", {}).get("commit", ""))


def check(root: Path, results_file: str, paths: tuple[str, ...]) -> Freshness:
    """The freshness of bench/results/``results_file`` in the repository at ``root`` against ``paths``."""
    location = root / RESULTS / results_file
    if not location.exists():
        return Freshness(results_file, "unknown", "", "no such results file: run its benchmark")
    commit = recorded_commit(json.loads(location.read_text()))
    revision = commit.removesuffix("-dirty")
    if not revision or git(root, "cat-file", "-e", f"{revision}^{{commit}}").returncode != 0:
        return Freshness(results_file, "unknown", commit, "records no commit of this repository")
    if git(root, "merge-base", "--is-ancestor", revision, "HEAD").returncode != 0:
        return Freshness(results_file, "unknown", commit, "its commit is not an ancestor of HEAD")
    later = git(root, "log", "--format=%h %s", f"{revision}..HEAD", "--", *paths).stdout.splitlines()
    if later:
        return Freshness(results_file, "stale", commit,
                         f"{len(later)} later commit(s) changed what it measures, newest: {later[0]}")
    if commit.endswith("-dirty"):
        return Freshness(results_file, "stale", commit, "measured on uncommitted changes")
    return Freshness(results_file, "fresh", commit, "no later commit changed what it measures")


def check_all(root: Path = REPO_ROOT) -> list[Freshness]:
    return [check(root, name, paths) for name, paths in MEASURES.items()]


def main() -> int:
    report = check_all()
    width = max(len(item.results_file) for item in report)
    for item in report:
        print(f"{item.results_file:<{width}}  {item.state:<7}  {item.commit[:12] or '-':<12}  {item.why}")
    return 0 if all(item.state == "fresh" for item in report) else 1


if __name__ == "__main__":
    sys.exit(main())
