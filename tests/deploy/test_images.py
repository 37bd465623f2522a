"""The container images (deploy/docker/): no container engine runs here, so their contents are proven by the tests
that run the same commands (tests/integration/test_wheel.py builds the wheel, installs it into a fresh venv
outside the checkout and serves Triton's models through it; the integration tier runs nvidia-pytriton's
tritonserver with the backend folder that prepare_backend_dir makes). These tests tie each RUN step to one of
those commands, check the pins against pyproject.toml and the chart, and lint the Dockerfiles with hadolint."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from samserve_dev.wheel_steps import BUILD_WHEEL, INSTALL_WHEEL, MAKE_VENV
from tests.deploy.conftest import CHART, REPO, run, tool

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\") and pending:
            keyword, _, rest = pending.partition(" ")
            result.append((keyword.upper(), rest.strip()))
            pending = ""
    return result


def arg_default(path: Path, name: str) -> str:
    (value,) = [rest.split("=", 1)[1] for keyword, rest in instructions(path)
                if keyword == "ARG" and rest.startswith(f"{name}=")]
    return value


def make_web_steps() -> list[list[str]]:
    """The commands of the Makefile's ``web`` recipes (run in web/ by `make setup`, so by every `make test`)."""
    steps = []
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\tcd web && "):
            steps.append(shlex.split(line.removeprefix("\tcd web && ")))
    assert len(steps) == 2, steps  # npm ci, then the build
    return steps


def step_kind(argv: list[str]) -> str | None:
    """Which tested command a RUN step is (None: none)."""
    if argv in make_web_steps():
        return "the web page (make web: the same npm commands)"
    python, args = argv[0], argv[1:]
    build_requires = PYPROJECT["build-system"]["requires"]
    if args[:len(BUILD_WHEEL)] == BUILD_WHEEL and args[len(BUILD_WHEEL)] == "-w" and len(args) == len(BUILD_WHEEL) + 3:
        return "build the wheel (test_wheel: BUILD_WHEEL)"
    if args[:len(MAKE_VENV)] == MAKE_VENV and len(args) == len(MAKE_VENV) + 1:
        return "fresh venv (test_wheel: MAKE_VENV)"
    if args[:len(INSTALL_WHEEL)] == INSTALL_WHEEL and python.endswith("/bin/python"):
        wheels = [a for a in args[len(INSTALL_WHEEL):] if a.endswith(".whl") or ".whl[" in a or ".whl${" in a]
        extras = [a for a in args[len(INSTALL_WHEEL):] if a not in wheels]
        optional = PYPROJECT["project"]["optional-dependencies"]
        declared = {r for group in optional.values() for r in group}
        if wheels and all(e.replace(" ", "") in {d.replace(" ", "") for d in declared} for e in extras):
            return "install the wheel into the venv (test_wheel: INSTALL_WHEEL; extras as pyproject declares them)"
        if not wheels and extras and all(e in declared for e in extras):
            return "an extra's requirement as pyproject declares it"
    if args[:len(INSTALL_WHEEL)] == INSTALL_WHEEL and args[len(INSTALL_WHEEL):] == ["./tools"]:
        return "the dev package (tools/, as `make setup` installs it; tests/e2e imports it in the loadtest image)"
    if args[:len(INSTALL_WHEEL)] == INSTALL_WHEEL and args[len(INSTALL_WHEEL):] == build_requires:
        return "pyproject's build requirements (what `make setup` installs before test_wheel builds)"
    if argv[:3] == ["apt-get", "update", "&&"] and "python3-venv" in argv:
        return "Ubuntu's venv module for NVIDIA's base (a Debian package; the e2e tier cannot pull that base)"
    if args[:1] == ["-c"] and "prepare_server_dir(" in args[1]:
        return "the backend folder (samserve.launch.triton_server.prepare_server_dir; tests/e2e runs the image)"
    return None


def test_every_run_step_is_a_command_the_tests_run():
    seen = set()
    for path in DOCKERFILES:
        for keyword, rest in instructions(path):
            if keyword != "RUN":
                continue
            argv = shlex.split(rest)
            kind = step_kind(argv)
            assert kind is not None, f"{path.name}: RUN {rest}\nis no command the tests run (see wheel_steps.py)"
            seen.add(kind.split(" (")[0])
    assert {"build the wheel", "fresh venv", "install the wheel into the venv", "the web page"} <= seen, seen


def test_a_changed_step_is_caught():
    assert step_kind(["python", "-m", "pip", "wheel", "--no-deps", "-w", "/dist", "/src"]) is None
    assert step_kind(["python", "-m", "pip", "install", "--disable-pip-version-check", "-q", "torch"]) is None


def test_versions_and_pins_agree():
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == version
    for path in DOCKERFILES:
        assert arg_default(path, "SAMSERVE_VERSION") == version, path.name
        assert arg_default(path, "PYTHON_VERSION") == "3.12", path.name
    # NVIDIA's release: one pin in triton.Dockerfile, equal to the chart's (Triton image tag and TensorRT Job).
    assert arg_default(DOCKER / "triton.Dockerfile", "TRITON_RELEASE") == values["tritonRelease"]
    froms = [rest for keyword, rest in instructions(DOCKER / "triton.Dockerfile") if keyword == "FROM"]
    assert "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3" in froms
    assert not [p for p in DOCKERFILES if re.search(r"tritonserver:\d", p.read_text())], "release pinned twice"
    # Paths that name the Python version follow the PYTHON_VERSION arg (exec-form entry points cannot expand it).
    for path in DOCKERFILES:
        spelled = set(re.findall(r"python3\.\d+", path.read_text()))
        assert not spelled, f"{path.name} spells {spelled}: use ${{PYTHON_VERSION}} or a version-free path"


def test_final_images_hold_no_sources_and_run_unprivileged():
    for path in DOCKERFILES:
        stages: list[list[tuple[str, str]]] = []
        for keyword, rest in instructions(path):
            if keyword == "FROM":
                stages.append([])
            if stages:
                stages[-1].append((keyword, rest))
        final = stages[-1]
        copies = [rest for keyword, rest in final if keyword == "COPY"]
        assert all(c.startswith("--from=") for c in copies), (path.name, copies)
        users = [rest for keyword, rest in final if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), path.name
        (entrypoint,) = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
        assert entrypoint.startswith("["), f"{path.name}: exec form, no shell"


def test_gateway_image_defaults():
    text = (DOCKER / "gateway.Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/samserve/bin/samserve", "gateway"]' in text
    assert "EXPOSE 50051 8080 9464" in text
    assert text.rstrip().splitlines()[-1].startswith("ENTRYPOINT"), "the gateway is the default (last) target"


def test_hadolint():
    run([tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), *map(str, DOCKERFILES)])


def test_hadolint_catches_a_problem(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    result = run([tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), str(bad)], check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout
