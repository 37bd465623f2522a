"""The packaging commands that tests/integration/test_wheel.py runs and the images' RUN steps repeat
(deploy/docker/*.Dockerfile; tests/deploy/test_images.py checks each RUN against these)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

BUILD_WHEEL = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-q"]
"""``python BUILD_WHEEL -w DIST SOURCE``: the wheel, without build isolation (the build requirements installed)."""

MAKE_VENV = ["-m", "venv"]
"""``python MAKE_VENV DIR``: the fresh environment the wheel goes into."""

INSTALL_WHEEL = ["-m", "pip", "install", "--disable-pip-version-check", "-q"]
"""``VENV/bin/python INSTALL_WHEEL WHEEL``: the wheel with its dependencies from the registry."""

REPO = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout or this venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("SAMSERVE_")}
    env.update(extra)
    return env


def copy_sources(destination: Path) -> Path:
    """What a fresh clone holds for the build: pyproject, setup.py, README, protos and the package folders
    (from pyproject's package-dir), without generated stubs, caches or build leftovers."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values()) | {"protos"}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".setuptools-build")
    destination.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", project["project"]["readme"]):
        shutil.copy2(REPO / name, destination / name)
    for folder in folders:
        shutil.copytree(REPO / folder, destination / folder, ignore=ignore)
    shutil.rmtree(destination / "service" / "samserve" / "v1", ignore_errors=True)  # generated, git-ignored
    return destination


def build_wheel(folder: Path) -> Path:
    """The wheel built from a clean copy of the sources under ``folder`` (BUILD_WHEEL, outside the checkout)."""
    source = copy_sources(folder / "src")
    dist = folder / "dist"
    result = subprocess.run([sys.executable, *BUILD_WHEEL, "-w", str(dist), str(source)], cwd=folder,
                            env=clean_env(PIP_NO_INPUT="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = dist.glob("samserve-*.whl")
    return wheel
