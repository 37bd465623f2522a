"""A real OCI engine for the e2e tier (tests/e2e): Debian's podman with runc, local base images, image builds.

No image registry is reachable here, so the bases the Dockerfiles name (``python:<v>-slim-bookworm``,
``node:<v>-bookworm-slim``) are made locally with mmdebstrap from Debian's packages and imported under those names:
the Python base carries what the official slim image has (python, pip, venv, the shared libpython, CA certificates;
no EXTERNALLY-MANAGED marker). Its Python is Debian bookworm's (3.11) and its Node.js Debian's (18), so builds pass
``PYTHON_VERSION`` and ``NODE_VERSION`` to match: the Dockerfiles themselves stay as they are for real registries.

pip and npm reach their registries from inside a build through ``--network host`` and the host's CA certificates,
pip and npm configuration files (and the local folders that pip's configuration names), mounted read-only for the
RUN steps only: nothing of that configuration ends up in an image.

The engine's own settings are ``tests/e2e/containers.conf`` (through ``CONTAINERS_CONF``): runc with the cgroupfs
manager and explicit ulimits, because crun cannot start containers on these machines (cgroups v1, no
CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE_CONF = REPO / "tests" / "e2e" / "containers.conf"
DEBIAN_SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3
NODE_VERSION = "18"      # bookworm's nodejs
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """A local stand-in for a registry image: Debian packages in a minbase root file system."""

    name: str
    packages: tuple[str, ...]
    customize: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()  # Dockerfile instructions applied on import (ENTRYPOINT, ...)


PYTHON_BASE = BaseImage(
    f"python:{PYTHON_VERSION}-slim-{DEBIAN_SUITE}",
    ("python3", "python3-venv", "python3-pip", "python-is-python3", f"libpython{PYTHON_VERSION}", "ca-certificates"),
    # The official image installs Python without Debian's marker that makes pip refuse system installs (PEP 668).
    ('rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',),
)
NODE_BASE = BaseImage(f"node:{NODE_VERSION}-{DEBIAN_SUITE}-slim", ("nodejs", "npm", "ca-certificates"))
# The chart's Redis (images.redis): Debian's redis-server (7.0), whose entry point takes the arguments as the
# official image's does.
REDIS_IMAGE = BaseImage(f"redis:7.0-{DEBIAN_SUITE}", ("redis-server",), changes=('ENTRYPOINT ["redis-server"]',))
BASES = (PYTHON_BASE, NODE_BASE)
BUILD_ARGS = {"PYTHON_VERSION": PYTHON_VERSION, "NODE_VERSION": NODE_VERSION}


class EngineError(RuntimeError):
    """A podman command failed; the message carries its output."""


def podman(*args: str, timeout_s: float = 600, check: bool = True,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` with the e2e engine configuration."""
    env = {**os.environ, "CONTAINERS_CONF": str(ENGINE_CONF)}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s, env=env,
                            input=input_text)
    if check and result.returncode != 0:
        raise EngineError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                          f"{result.stderr[-4000:]}")
    return result


def engine_unavailable() -> str | None:
    """Why no container can run here (None: the engine works)."""
    if os.geteuid() != 0:
        return "the e2e tier runs podman as root (the chart's pods need their own network namespaces)"
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make e2e` installs Debian's podman, runc and mmdebstrap as root)"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout_s=60)
    if info.returncode != 0:
        return f"podman cannot start: {info.stderr.strip()[-500:]}"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False, timeout_s=60).returncode == 0


def ensure_base(base: BaseImage) -> float:
    """Make and import ``base`` unless the engine has it; seconds spent (0.0 when it was there)."""
    if image_exists(base.name):
        return 0.0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="samserve-base-") as folder:
        rootfs = Path(folder) / "rootfs.tar"
        command = ["mmdebstrap", "--variant=minbase", f"--include={','.join(base.packages)}"]
        command += [f"--customize-hook={hook}" for hook in base.customize]
        command += [DEBIAN_SUITE, str(rootfs)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise EngineError(f"mmdebstrap for {base.name} exited {result.returncode}:\n{result.stderr[-4000:]}")
        changes = [f"ENV {PATH_ENV}", *base.changes]
        podman("import", *[a for change in changes for a in ("--change", change)], str(rootfs), base.name)
    return time.monotonic() - start


def _pip_config_paths() -> list[Path]:
    """The host's pip configuration files and the local folders and files their values name."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True,
                             timeout=60).stdout
    files = [Path(m) for m in re.findall(r"^\s+(/\S+), exists: True", listing, flags=re.MULTILINE)]
    paths: list[Path] = []
    for config_file in files:
        paths.append(config_file)
        parser = configparser.ConfigParser()
        parser.read(config_file)
        for section in parser.sections():
            for value in parser[section].values():
                for word in value.split():
                    local = Path(word.removeprefix("file://"))
                    if local.name == "simple":  # a local index: its pages link to ../../files/
                        local = local.parent
                    if local.is_absolute() and local.exists():
                        paths.append(local)
    return paths


def _npm_config_paths() -> list[Path]:
    if shutil.which("npm") is None:
        return []
    paths = []
    for key in ("globalconfig", "userconfig"):
        value = subprocess.run(["npm", "config", "get", key], capture_output=True, text=True, timeout=60).stdout
        if value.strip() and Path(value.strip()).is_file():
            paths.append(Path(value.strip()))
    return paths


def host_registry_mounts() -> list[str]:
    """``--volume`` arguments that let pip and npm in a RUN step reach their registries as the host does."""
    mounts: dict[str, str] = {}
    certificates = Path("/etc/ssl/certs")
    if certificates.is_dir():
        mounts[str(certificates)] = str(certificates)
    for path in _pip_config_paths():
        mounts[str(path)] = str(path)
    for path in _npm_config_paths():
        mounts[str(path)] = str(path)
        if path.name == "npmrc":  # the global file: Debian's npm reads it from /etc/npmrc
            mounts["/etc/npmrc"] = str(path)
    arguments = []
    for target, source in sorted(mounts.items()):
        if any(Path(target).is_relative_to(folder) for folder in mounts if folder != target):
            continue  # inside a folder mounted already
        arguments += ["--volume", f"{source}:{target}:ro"]
    return arguments


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    tag: str
    dockerfile: str
    target: str | None
    build_seconds: float
    size_bytes: int
    cached_steps: int
    """Steps the engine's layer cache answered (0: everything built in this run)."""


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag, timeout_s=60).stdout.strip())


def build_image(dockerfile: Path, tag: str, target: str | None = None,
                build_args: dict[str, str] | None = None, timeout_s: float = 3600) -> BuiltImage:
    """``podman build`` from the repository root, bases from local storage only (``--pull=never``)."""
    args = ["build", "--pull=never", "--network", "host", "--file", str(dockerfile), "--tag", tag,
            "--layers=true", *host_registry_mounts()]
    for name, value in {**BUILD_ARGS, **(build_args or {})}.items():
        args += ["--build-arg", f"{name}={value}"]
    if target:
        args += ["--target", target]
    start = time.monotonic()
    output = podman(*args, str(REPO), timeout_s=timeout_s).stdout
    seconds = time.monotonic() - start
    return BuiltImage(tag, str(dockerfile.relative_to(REPO)), target, round(seconds, 1), image_size(tag),
                      output.count("Using cache"))


VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image the chart runs: its ``images.<values_key>`` entry, Dockerfile, stage and the tag the chart's
    defaults give it (repository:tag as values.yaml and the chart's helpers name them)."""

    values_key: str
    dockerfile: str
    target: str | None
    tag: str

    @property
    def path(self) -> Path:
        return REPO / "deploy" / "docker" / self.dockerfile


IMAGES = (
    ImageSpec("gateway", "gateway.Dockerfile", None, f"samserve-gateway:{VERSION}"),
    ImageSpec("loadtest", "gateway.Dockerfile", "loadtest", f"samserve-loadtest:{VERSION}"),
    ImageSpec("prepare", "gateway.Dockerfile", "prepare", f"samserve-prepare:{VERSION}"),
    ImageSpec("triton", "triton-cpu.Dockerfile", None, f"samserve-triton:{VERSION}-cpu"),
)
