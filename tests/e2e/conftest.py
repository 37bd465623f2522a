"""The e2e tier (``make e2e``, run by ``.ci/run`` after ``make test``): what platform teams run, run for real.

- ``test_images.py``: the gateway, triton-cpu, prepare and loadtest images built by a real OCI engine (podman with
  runc, tools/samserve_dev/containers.py) on local stand-ins for their registry bases; sizes and build times go to
  bench/results/images_cpu.json.
- ``test_gpu_python_layer.py``: what the GPU Triton image adds to NVIDIA's base (which cannot be pulled here),
  installed into clean venvs outside the checkout, one per ``SAMSERVE_EXTRAS`` value, and run on the tiny model.
- ``test_pods.py``: the chart's cpu profile rendered and its pods started from those images by ``podman kube play``
  (tools/samserve_dev/kube_play.py), then called as clients would: probes, gRPC, HTTP, the page, Locust, a pod killed
  under load; cold start and the load figures go to bench/results/pods_cpu.json.

Every test here is marked ``e2e``. Where the engine cannot start (not root, podman missing or refusing), the tier
skips with that reason; on these machines it must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import write_e2e_results
from samserve_dev import containers
from samserve_dev.containers import IMAGES, BuiltImage, engine_unavailable, podman

HERE = Path(__file__).parent
BUILD_TIMEOUT_S = 2400


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def engine() -> None:
    """A working podman (the tests that need none, e.g. the GPU layer's venvs, do not ask for it)."""
    reason = engine_unavailable()
    if reason:
        pytest.skip(f"no container engine: {reason}")


@pytest.fixture(scope="session")
def built_images(engine: None) -> Iterator[dict[str, BuiltImage]]:
    """Every image of :data:`IMAGES`, built now (images_cpu.json records the builds). With
    ``SAMSERVE_E2E_REUSE_IMAGES=1`` images already tagged are used as they are and nothing is recorded: for
    iterating on the tests, never for figures."""
    if os.environ.get("SAMSERVE_E2E_REUSE_IMAGES") == "1" and all(containers.image_exists(i.tag) for i in IMAGES):
        yield {i.values_key: BuiltImage(i.tag, i.dockerfile, i.target, 0.0, containers.image_size(i.tag), -1)
               for i in IMAGES}
        return
    # What earlier runs left (untagged images of replaced builds; a prepare image is 6 GB) goes first.
    podman("image", "prune", "--force", timeout_s=600)
    bases = {base.name: round(containers.ensure_base(base), 1) for base in containers.BASES}
    built = {image.values_key: containers.build_image(image.path, image.tag, image.target, timeout_s=BUILD_TIMEOUT_S)
             for image in IMAGES}
    # The build stages' images (the prepare stage's venv alone is 7 GB) are not needed by the tests: disk for the pods.
    podman("image", "prune", "--force", timeout_s=600)
    write_e2e_results("images_cpu.json", {
        "what": "deploy/docker images built by podman (runc) on local Debian stand-ins for the registry bases",
        "engine": podman("version", "--format", "{{.Client.Version}}").stdout.strip(),
        "build_args": containers.BUILD_ARGS,
        "bases_made_seconds": bases,
        "images": {key: {"tag": image.tag, "dockerfile": image.dockerfile, "target": image.target,
                         "build_seconds": image.build_seconds, "size_mb": round(image.size_bytes / 1e6, 1),
                         "cached_steps": image.cached_steps} for key, image in built.items()},
    })
    yield built
