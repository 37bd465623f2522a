"""The images of deploy/docker/ built by a real engine and started the way the chart starts them: uid 65532, a
read-only root file system, every capability dropped, no network. Sizes and build times go to
bench/results/images_cpu.json (build times include pip and npm downloads; ``cached_steps`` says how many steps the
engine's layer cache answered in that run)."""

from __future__ import annotations

from samserve_dev.containers import podman

LOCKED_DOWN = ("run", "--rm", "--pull=never", "--read-only", "--cap-drop=all", "--user", "65532:65532",
               "--network", "none", "--security-opt", "no-new-privileges")


def run_locked_down(tag: str, *command: str, entrypoint: str | None = None) -> str:
    args = [*LOCKED_DOWN, *(["--entrypoint", entrypoint] if entrypoint else []), tag, *command]
    return podman(*args, timeout_s=600).stdout


def test_gateway_image_holds_the_service_and_the_page(built_images):
    out = run_locked_down(built_images["gateway"].tag, "-c", (
        "import importlib.resources as r, os\n"
        "import samserve.core.api, samserve.transport.grpc_server, samserve.transport.http.app\n"
        "page = r.files('samserve') / 'web_static'\n"
        "print(os.getuid(), sorted(p.name for p in page.iterdir()))"), entrypoint="/opt/samserve/bin/python")
    uid, _, files = out.strip().partition(" ")
    assert uid == "65532"
    assert "'index.html'" in files and "'app.js'" in files, files


def test_triton_image_starts_tritonserver_with_its_python_backend(built_images, tmp_path):
    # Without a repository it stops at once, after loading its libraries (the pods test serves models with it).
    result = podman(*LOCKED_DOWN, built_images["triton"].tag, "--model-repository=/nonexistent", check=False,
                    timeout_s=120)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "failed to stat file /nonexistent" in log, log[-3000:]
    stub = run_locked_down(built_images["triton"].tag, "-c",
                           "import os; p = '/opt/triton/backends/python/triton_python_backend_stub';"
                           " print(os.path.exists(os.path.realpath(p)))", entrypoint="/opt/samserve/bin/python")
    assert stub.strip() == "True"


def test_prepare_image_runs_its_entry_point(built_images):
    out = run_locked_down(built_images["prepare"].tag, "--help")
    assert "usage" in out.lower(), out
    imports = run_locked_down(built_images["prepare"].tag, "-c",
                              "import samserve_build.cli, samserve_build.cpu_choice, torch, onnx, onnxruntime,"
                              " openvino; print('ok')", entrypoint="/opt/samserve/bin/python")
    assert imports.strip() == "ok"


def test_loadtest_image_runs_locust(built_images):
    assert run_locked_down(built_images["loadtest"].tag, "--version").strip().startswith("locust ")
    # The chart's locustfile imports its seeded images from the dev package the image installs.
    out = run_locked_down(built_images["loadtest"].tag, "-c", (
        "from samserve_dev.images import synthetic_image\n"
        "print(synthetic_image(4, 6, 0).shape)"), entrypoint="/opt/samserve/bin/python")
    assert out.strip() == "(4, 6, 3)"


def test_final_images_run_as_65532_without_root_paths_to_write(built_images):
    for image in built_images.values():
        user = podman("image", "inspect", "--format", "{{.Config.User}}", image.tag).stdout.strip()
        assert user == "65532:65532", (image.tag, user)
