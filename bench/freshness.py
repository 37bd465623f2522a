"""Which results files are stale: measured at a commit older than the code they measure.

Every results file records the commit it ran on (``environment.commit``; ``-dirty`` when tracked code differed
from that commit). :data:`MEASURES` says, per results file, which paths of the repository its figures depend on:
the benchmark script, the shared benchmark plumbing, and the code it times. A file is

* ``fresh`` when no commit after its own changed any of those paths in a way a figure can see: comments,
  docstrings, type annotations and documentation (``.md``) do not count (:func:`figure_changes`),
* ``stale`` when one did (the commits and files are listed), or when it ran on uncommitted changes (``-dirty``),
* ``unknown`` when it records no commit, or one that is not in this repository's history.

``make bench-status`` prints the table and exits 1 when a file is not fresh; ``make bench`` re-runs the benchmarks
of the files that are not (``--stale-benchmarks``), ``make bench-all`` every benchmark.
"""

from __future__ import annotations

import ast
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
NOT_MEASURED = ("service/samserve/labelstudio", "service/samserve/cli/labelstudio.py",
                "tools/samserve_dev/settings_doc.py")
"""Under a measured path, but run by no benchmark: the Label Studio ML backend, a client of the gateway (the
import rule, pyproject.toml, keeps the layers below it from importing it; the CLI loads it only for its own
command), and the generator of docs/settings.md."""
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
    "amg_cpu.json": ("bench/amg_cpu.py", "bench/amg_figures.py", "bench/gateway_cpu.py", *PLUMBING, *SERVING_PATH,
                     "build/checkpoints/samserve_scenes_v1.pth"),
    "export_cpu.json": ("bench/export_cpu.py", "bench/common.py", "build/samserve_build/export.py",
                        "build/samserve_build/graphs.py",
                        "build/samserve_build/architectures.py", "service/samserve/core/model_spec.py"),
    "request_memory_cpu.json": ("bench/request_memory_cpu.py", "bench/amg_cpu.py", *PLUMBING, *SERVING_PATH,
                                "build/checkpoints/samserve_scenes_v1.pth"),
    "soak_cpu.json": ("bench/soak.py", *PLUMBING, *SERVING_PATH, "build/checkpoints/samserve_scenes_v1.pth"),
    "browser_cpu.json": ("bench/browser_cpu.py", *PLUMBING, *SERVING_PATH, "web",
                         "build/checkpoints/samserve_scenes_v1.pth"),
    "multihost_cpu.json": ("bench/multihost_cpu.py", *PLUMBING, *SERVING_PATH),
    "polygons_cpu.json": ("bench/polygons_cpu.py", "bench/polygon_figures.py", "bench/amg_cpu.py", *PLUMBING,
                          *SERVING_PATH, "build/samserve_build/scenes.py", "build/samserve_build/evaluation.py",
                          "build/checkpoints/samserve_scenes_v1.pth"),
    "interact_cpu.json": ("bench/interact_cpu.py", "bench/amg_cpu.py", *PLUMBING, *SERVING_PATH,
                          "build/samserve_build/scenes.py", "build/checkpoints/samserve_scenes_v1.pth"),
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


NO_FIGURE_SUFFIXES = (".md",)
"""Files under a measured path that no figure depends on (documentation)."""


def _strip_annotations_and_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without what cannot change a figure: docstrings, the annotations of function signatures and of
    module-level and local variables (comments are not in the tree at all). Class-level annotations stay: they
    are dataclass and pydantic fields."""

    def strip_docstring(body: list[ast.stmt]) -> None:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body[:] = body[1:] or [ast.Pass()]

    def strip_body(body: list[ast.stmt], in_class: bool) -> list[ast.stmt]:
        kept: list[ast.stmt] = []
        for statement in body:
            if isinstance(statement, ast.AnnAssign) and not in_class:
                if statement.value is None:
                    continue
                statement = ast.Assign(targets=[statement.target], value=statement.value, lineno=0)
            kept.append(statement)
        return kept

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            strip_docstring(node.body)
            node.body = strip_body(node.body, isinstance(node, ast.ClassDef))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            for argument in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                             node.args.vararg, node.args.kwarg):
                if argument is not None:
                    argument.annotation = None
    return tree


def code_fingerprint(text: str) -> str | None:
    """The Python source ``text`` as far as it can change a figure (:func:`_strip_annotations_and_docstrings`);
    None when it does not parse."""
    try:
        return ast.dump(_strip_annotations_and_docstrings(ast.parse(text)), include_attributes=False)
    except SyntaxError:
        return None


def pathspecs(paths: tuple[str, ...]) -> list[str]:
    """``paths`` for git, minus :data:`NOT_MEASURED`."""
    return [*paths, *(f":(exclude){path}" for path in NOT_MEASURED)]


def figure_changes(root: Path, revision: str, paths: tuple[str, ...]) -> list[str]:
    """The files under ``paths`` (but :data:`NOT_MEASURED`) that changed from ``revision`` to HEAD in a way a
    figure can see: every added, deleted or non-Python file (but documentation), and Python files whose code
    differs beyond comments, docstrings and type annotations."""
    diff = git(root, "diff", "--name-status", "--no-renames", revision, "HEAD", "--",
               *pathspecs(paths)).stdout.splitlines()
    changed = []
    for line in diff:
        status, _, name = line.partition("\t")
        if name.endswith(NO_FIGURE_SUFFIXES):
            continue
        if status == "M" and name.endswith(".py"):
            before = git(root, "show", f"{revision}:{name}").stdout
            after = git(root, "show", f"HEAD:{name}").stdout
            fingerprint = code_fingerprint(before)
            if fingerprint is not None and fingerprint == code_fingerprint(after):
                continue
        changed.append(name)
    return changed


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
    changed = figure_changes(root, revision, paths)
    if changed:
        later = git(root, "log", "--format=%h %s", f"{revision}..HEAD", "--", *changed).stdout.splitlines()
        return Freshness(results_file, "stale", commit,
                         f"{len(later)} later commit(s) changed what it measures ({', '.join(changed[:3])}"
                         f"{', ...' if len(changed) > 3 else ''}), newest: {later[0] if later else '?'}")
    exempt = git(root, "log", "--format=%h", f"{revision}..HEAD", "--", *pathspecs(paths)).stdout.split()
    if exempt:
        return Freshness(results_file, "fresh", commit, f"{len(exempt)} later commit(s) changed only comments, "
                         "docstrings, type annotations or docs in what it measures")
    if commit.endswith("-dirty"):
        return Freshness(results_file, "stale", commit, "measured on uncommitted changes")
    return Freshness(results_file, "fresh", commit, "no later commit changed what it measures")


def check_all(root: Path = REPO_ROOT) -> list[Freshness]:
    return [check(root, name, paths) for name, paths in MEASURES.items()]


def remeasure_command(results_file: str) -> str:
    """What re-measures ``results_file``: its benchmark module, or the test tier that writes it."""
    source = MEASURES[results_file][0]
    if source.startswith("bench/"):
        return "python -m bench." + Path(source).stem
    return "make e2e" if source.startswith("tests/e2e/") else source


def run_times(root: Path) -> dict[str, float]:
    """Seconds each benchmark's process ran when it wrote its results file (``environment.run_s``), by file."""
    times = {}
    for name in MEASURES:
        location = root / RESULTS / name
        if location.exists():
            run_s = json.loads(location.read_text()).get("environment", {}).get("run_s")
            if run_s is not None:
                times[name] = float(run_s)
    return times


def print_run_times(root: Path) -> None:
    """What each benchmark took when it last ran, and the sum: the time ``make bench-all`` spends on them."""
    times = run_times(root)
    if times:
        print("\nrun time of each benchmark when it last ran: " + ", ".join(
            f"{name.removesuffix('.json')} {seconds / 60:.1f}" for name, seconds in times.items())
            + f" (minutes; {sum(times.values()) / 60:.1f} in all)")


def stale_benchmarks(report: list[Freshness], order: list[str]) -> list[str]:
    """The benchmark modules (names as in ``order``, e.g. ``amg_cpu``, kept in that order) whose results file is
    not fresh: what ``make bench`` runs. Files that a test tier writes (``make e2e``) are not among them."""
    stale = {Path(MEASURES[item.results_file][0]).stem for item in report
             if item.state != "fresh" and MEASURES[item.results_file][0].startswith("bench/")}
    return [name for name in order if name in stale]


def main() -> int:
    if sys.argv[1:2] == ["--stale-benchmarks"]:
        print(" ".join(stale_benchmarks(check_all(), sys.argv[2:])))
        return 0
    report = check_all()
    width = max(len(item.results_file) for item in report)
    for item in report:
        print(f"{item.results_file:<{width}}  {item.state:<7}  {item.commit[:12] or '-':<12}  {item.why}")
    print_run_times(REPO_ROOT)
    stale = [item.results_file for item in report if item.state != "fresh"]
    if stale:
        print("\nnot fresh; re-measure on an idle machine, on committed code (`make bench` runs the stale ones, "
              "`make bench-all` every benchmark):")
        for name in stale:
            print(f"  {remeasure_command(name):<34}  # {name}")
    return 0 if not stale else 1


if __name__ == "__main__":
    sys.exit(main())
