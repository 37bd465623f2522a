"""Packaging outside the repository: build the wheel from a clean copy of the sources (no generated stubs in it),
install it with its dependencies into a fresh virtual environment outside the checkout, and run that
environment's `samserve gateway` (cwd outside the checkout, no PYTHONPATH) against a real Triton server; answer
Embed and Segment over a real gRPC channel.

Self-contained on purpose: it relies on the `tiny_triton` fixture, `samserve.client.typed_client` and the SAMSERVE_*
environment variables only. Its pip and venv commands come from tools/samserve_dev/wheel_steps.py, which the container
images' RUN steps repeat (deploy/docker/, checked by tests/deploy/test_images.py).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve_dev.wheel_steps import BUILD_WHEEL, INSTALL_WHEEL, MAKE_VENV, clean_env, copy_sources

REPO = Path(__file__).resolve().parents[2]
SERVICE_NAME = "samserve.v1.SegmentAnything"
STUBS = ["samserve/v1/__init__.py", "samserve/v1/samserve_pb2.py", "samserve/v1/samserve_pb2.pyi",
         "samserve/v1/samserve_pb2_grpc.py", "samserve/v1/samserve.binpb"]
INSTALL_TIMEOUT_S = 600
GATEWAY_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def health(target: str, service: str = "") -> str | None:
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def png(height: int, width: int) -> bytes:
    """A bright rectangle on a dark gradient."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([(rows * 255 // height), (cols * 255 // width), np.full_like(rows, 40)], -1).astype(np.uint8)
    image[height // 4: height // 2, width // 3: 2 * width // 3] = (250, 240, 30)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.timeout(1200)
def test_wheel_installs_and_serves_outside_the_checkout(tiny_triton, tmp_path):
    timings: dict[str, float] = {}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(REPO)

    # 1. The wheel, built from sources without stubs: the build hook generates them.
    started = time.monotonic()
    source = copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    run([sys.executable, *BUILD_WHEEL, "-w", str(dist), str(source)], cwd=outside, timeout_s=300,
        env=clean_env(PIP_NO_INPUT="1"))
    (wheel,) = dist.glob("samserve-*.whl")
    timings["wheel build"] = time.monotonic() - started
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert set(STUBS) <= names, sorted(n for n in names if n.startswith("samserve/"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [r for r in requires if "grpcio-tools" in r], requires   # a build requirement only

    # 2. A fresh virtual environment outside the checkout; the wheel with its dependencies from the registry.
    started = time.monotonic()
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, *MAKE_VENV, str(venv)], cwd=outside, timeout_s=120)
    timings["venv"] = time.monotonic() - started
    started = time.monotonic()
    run([str(venv / "bin" / "python"), *INSTALL_WHEEL, str(wheel)],
        cwd=outside, timeout_s=INSTALL_TIMEOUT_S, env=clean_env(PIP_NO_INPUT="1"))
    timings["install"] = time.monotonic() - started

    # The installed package, not the checkout: samserve and its stubs live in the venv; no grpcio-tools there.
    probe = run([str(venv / "bin" / "python"), "-c", (
        "import importlib.util, json, samserve, samserve.core.api as api\n"
        "print(json.dumps({'samserve': samserve.__file__, 'pb': api.pb.__file__, 'pb_grpc': api.pb_grpc.__file__,"
        " 'grpc_tools': importlib.util.find_spec('grpc_tools') is not None}))")], cwd=outside, timeout_s=120)
    where = json.loads(probe.strip().splitlines()[-1])
    for name in ("samserve", "pb", "pb_grpc"):
        path = Path(where[name]).resolve()
        assert path.is_relative_to(venv.resolve()), (name, path)
        assert not path.is_relative_to(REPO), (name, path)
    assert not where["grpc_tools"], "grpcio-tools is installed at run time"

    # 3. That venv's `samserve gateway` against the real Triton server.
    started = time.monotonic()
    host, triton_port = tiny_triton.url.rsplit(":", 1)
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    target = f"127.0.0.1:{port}"
    env = clean_env(
        SAMSERVE_GATEWAY_PORT=str(port), SAMSERVE_METRICS_PORT=str(metrics_port), SAMSERVE_HTTP_PORT=str(http_port),
        SAMSERVE_TRITON_HOST=host,
        SAMSERVE_TRITON_GRPC_PORT=triton_port, SAMSERVE_HEALTH_CHECK_INTERVAL_S="0.2", SAMSERVE_AUTH="off",
    )
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        gateway = subprocess.Popen([str(venv / "bin" / "samserve"), "gateway"], cwd=outside, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
        while health(target) != "SERVING":
            assert gateway.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, f"not serving:\n{log_path.read_text(errors='replace')}"
            time.sleep(0.2)
        assert health(target, SERVICE_NAME) == "SERVING"
        timings["gateway start"] = time.monotonic() - started
        # The HTTP transport from the wheel, with the OpenAPI descriptions from the shipped descriptor set.
        document = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/openapi.json", timeout=10).read())
        assert "decoded as one batch" in document["paths"]["/v1/images:segment"]["post"]["description"]

        started = time.monotonic()
        height, width = 150, 200
        image = png(height, width)
        with SamServeClient(target, timeout_s=120) as client:
            embedded = client.embed(image)
            assert (embedded.height, embedded.width) == (height, width)
            assert embedded.image_id
            (by_id,) = client.segment(embedded.image_id, [PromptSpec(points=[(100, 55)], labels=[1])])
            (by_bytes,) = client.segment(image, [PromptSpec(box=(60, 35, 135, 75), multimask_output=False)])
        timings["embed + segment"] = time.monotonic() - started
        assert by_id.masks.shape == (3, height, width) and by_id.masks.dtype == bool
        assert by_id.predicted_iou.shape == (3,) and np.isfinite(by_id.predicted_iou).all()
        assert by_bytes.masks.shape == (1, height, width)
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            code = gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            code = gateway.wait()
    assert code == 0, log_path.read_text(errors="replace")
    print("\nwheel test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.1f}")
