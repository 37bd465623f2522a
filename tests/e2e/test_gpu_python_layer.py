"""The GPU Triton image's Python layer (deploy/docker/triton.Dockerfile). Its base, NVIDIA's Triton release image,
cannot be pulled here, so what the image adds on top of it is tested instead: for each ``SAMSERVE_EXTRAS`` value,
a clean venv outside the checkout gets exactly what the Dockerfile's install step names (read from the file), then
imports every entry of ``samserve.backends.python_model.RUNTIMES`` and loads each target's models the way Triton's
python
backend does, on the tiny model (gpu-torch on the CPU). The venv's Python is this machine's (3.11), not the
image's (3.12)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samserve_build.repository import write_repository
from samserve_dev.served_models import export_random
from samserve_dev.wheel_steps import INSTALL_WHEEL, MAKE_VENV, build_wheel, clean_env
from tests.deploy.test_images import instructions

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "triton.Dockerfile"
CHECK = Path(__file__).with_name("python_layer_check.py")
VENV_PREFIX = "/opt/samserve"
# SAMSERVE_EXTRAS: "" for the cpu-* and gpu-tensorrt targets, "gpu" for gpu-torch (the Dockerfile's comment).
EXTRAS = {"": ("cpu-onnxruntime", "cpu-openvino"), "gpu": ("cpu-onnxruntime", "cpu-openvino", "gpu-torch")}
TORCH_PARAMETERS = {"device": "cpu", "precision": "fp32"}
INSTALL_TIMEOUT_S = 1200


def install_arguments(wheel: Path, extras: str) -> list[str]:
    """The arguments after INSTALL_WHEEL of the Dockerfile's install step, with its variables expanded."""
    steps = [shlex.split(rest) for keyword, rest in instructions(DOCKERFILE)
             if keyword == "RUN" and rest.startswith(f"{VENV_PREFIX}/bin/python -m pip install")]
    (argv,) = steps
    assert argv[1:1 + len(INSTALL_WHEEL)] == INSTALL_WHEEL, argv
    arguments = []
    for argument in argv[1 + len(INSTALL_WHEEL):]:
        if argument.startswith("/dist/samserve-"):
            argument = str(wheel) + (f"[{extras}]" if extras else "")
        assert "$" not in argument, f"unexpanded variable in {argument}"
        arguments.append(argument)
    return arguments


def test_install_step_is_read_from_the_dockerfile(tmp_path):
    arguments = install_arguments(tmp_path / "samserve-0.1.0-py3-none-any.whl", "gpu")
    assert arguments[0].endswith(".whl[gpu]")
    assert any(a.startswith("onnxruntime") for a in arguments) and any(a.startswith("openvino") for a in arguments)
    assert 'ARG SAMSERVE_EXTRAS=""' in DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def repositories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("python-layer")
    model = export_random("tiny", 0, root)
    repos = {}
    for target in EXTRAS["gpu"]:
        torch = target == "gpu-torch"
        repos[target] = write_repository(model.directory, root / f"repository-{target}", target,
                                         checkpoint=model.checkpoint if torch else None,
                                         instance_kind="KIND_CPU" if torch else None,
                                         parameters=TORCH_PARAMETERS if torch else None)
    return repos


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("python-layer-wheel"))


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 600)
@pytest.mark.parametrize("extras", sorted(EXTRAS), ids=lambda e: f"extras={e or 'none'}")
def test_every_runtime_of_the_image_loads_and_runs(extras, wheel, repositories, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, *MAKE_VENV, str(venv)], check=True, timeout=300, cwd=outside)
    install = subprocess.run([str(venv / "bin" / "python"), *INSTALL_WHEEL, *install_arguments(wheel, extras)],
                             cwd=outside, env=clean_env(PIP_NO_INPUT="1"), capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    targets = EXTRAS[extras]
    report_path = outside / "report.json"
    check = subprocess.run([str(venv / "bin" / "python"), str(CHECK), str(report_path),
                            *[f"{t}={repositories[t]}" for t in targets]],
                           cwd=outside, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-4000:]
    report = json.loads(report_path.read_text())

    # Every runtime the image's targets need imports; torch only where the extra installs it; the exporter's onnx
    # is never needed by the serving runtime.
    assert report["imports"]["onnxruntime"] == "ok" and report["imports"]["openvino"] == "ok", report["imports"]
    if extras == "gpu":
        assert report["imports"]["torch"] == "ok", report["imports"]
    else:
        assert report["imports"]["torch"].startswith("ImportError"), report["imports"]
    assert report["onnx_imported"] is False, "a serving runtime imported the exporter's onnx"
    for target in targets:
        summary = report["targets"][target]
        assert summary["finite"], (target, summary)
        assert summary["embedding_shape"][0] == 1 and len(summary["low_res_masks_shape"]) == 4, summary
    # The same weights give the same embedding whatever the runtime (fp32 everywhere here).
    reference = np.load(outside / "cpu-onnxruntime-embedding.npy")
    for target in targets[1:]:
        other = np.load(outside / f"{target}-embedding.npy")
        np.testing.assert_allclose(other, reference, atol=2e-3, rtol=1e-3, err_msg=target)
