"""`samserve labelstudio` against a real Label Studio (its own venv, .labelstudio/, made by `make setup`: it needs
numpy 2) and a real gateway on the shipped model. Label Studio runs on SQLite in a temporary folder, on loopback,
with no browser; tests/integration/labelstudio_driver.py drives it through its SDK, as an integration would.

What each test proves:
* Label Studio connects the backend (its /health and /setup), relays the editor's interactive requests (a click,
  then a box) and the backend's brushes decode to exactly samserve's Segment mask for the same prompt; Label Studio
  stores that answer as a prediction and gives it back unchanged;
* PolygonLabels: the same with polygons (the exterior rings of Segment's MASK_ENCODING_POLYGON answer);
* "Retrieve predictions" (no prompt): Label Studio stores GenerateMasks' masks as brushes, and a task whose image
  it cannot serve fails alone, with its reason in the backend's answer;
* a labeling config the backend cannot answer: /setup names the tag, and Label Studio refuses the backend;
* a personal access token (a JWT) reads task images as the legacy token does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from label_studio_converter import brush

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import pb
from samserve.vision import polygons
from samserve_build import evaluation, scenes
from samserve_dev.images import png_bytes
from samserve_dev.local_stack import GatewayProcess, free_port
from samserve_dev.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VENV = Path(os.environ.get("SAMSERVE_TEST_LABEL_STUDIO_VENV", ROOT / ".labelstudio"))
DRIVER = Path(__file__).with_name("labelstudio_driver.py")
TOKEN = "5a4d3e2f1c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d"
"""The legacy API token the test's Label Studio user gets (``--user-token``)."""
GENERATE = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.5}
"""Pre-annotation at the shipped model's card thresholds (at the official defaults it keeps no mask)."""
SEED = scenes.EVAL_SEED_OFFSET + 7

CONTROLS = """
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object" smart="true"/></RectangleLabels>
</View>"""
BRUSH_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>""" + CONTROLS
POLYGON_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels")


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(command: list[str], env: dict[str, str], log_path: Path, health: str, timeout_s: float) -> Server:
    """``command`` as a process logging to ``log_path``, once ``health`` answers 200."""
    process = subprocess.Popen(command, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    server = Server(health.rsplit("/", 1)[0], process, log_path)

    def answers() -> bool:
        assert process.poll() is None, f"{command[0]} exited:\n{server.log()}"
        try:
            return httpx.get(health, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, bool, f"{health} answering 200", timeout_s=timeout_s, interval_s=0.5)
    return server


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    executable = LABEL_STUDIO_VENV / "bin" / "label-studio"
    assert executable.exists(), f"no {executable}: `make setup` installs Label Studio there"
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    # Label Studio 1.23 refuses a backend on a loopback or private address, and the webhook it adds for it, unless
    # ML_BLOCK_LOCAL_IP and USE_DEFAULT_BANNED_SUBNETS are off (docs/labelstudio.md).
    env = dict(os.environ, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", ML_BLOCK_LOCAL_IP="false",
               USE_DEFAULT_BANNED_SUBNETS="false", LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    server = start([str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                    "--data-dir", str(data), "--username", "annotator@example.com", "--password", "samserve-test",
                    "--user-token", TOKEN], env, data / "label-studio.log", f"http://127.0.0.1:{port}/health", 600)
    yield server
    server.stop()


def start_backend(gateway: GatewayProcess, label_studio: Server, api_key: str, folder: Path) -> Server:
    """`samserve labelstudio` in front of ``gateway``, reading task images from ``label_studio`` with ``api_key``."""
    port = free_port()
    env = dict(os.environ, SAMSERVE_LABELSTUDIO_PORT=str(port), SAMSERVE_LABELSTUDIO_GATEWAY=gateway.target,
               SAMSERVE_LABELSTUDIO_URL=label_studio.url, SAMSERVE_LABELSTUDIO_API_KEY=api_key,
               SAMSERVE_LABELSTUDIO_GENERATE_PARAMS=json.dumps(GENERATE))
    return start([str(Path(sys.executable).parent / "samserve"), "labelstudio"], env, folder / "backend.log",
                 f"http://127.0.0.1:{port}/health", 60)


@pytest.fixture(scope="module")
def backend(scenes_gateway: GatewayProcess, label_studio: Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_backend(scenes_gateway, label_studio, TOKEN, tmp_path_factory.mktemp("backend"))
    yield server
    server.stop()


class Driver:
    """tests/integration/labelstudio_driver.py in Label Studio's venv: one JSON line per call."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen([str(LABEL_STUDIO_VENV / "bin" / "python"), str(DRIVER), url, TOKEN],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the driver exited ({self.process.poll()}) on {op}"
        return json.loads(line)

    def __call__(self, op: str, **args: Any) -> Any:
        answer = self.answer(op, **args)
        assert "ok" in answer, f"Label Studio refused {op}: {answer}"
        return answer["ok"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def driver(label_studio: Server) -> Iterator[Driver]:
    driving = Driver(label_studio.url)
    yield driving
    driving.close()


@dataclasses.dataclass(frozen=True)
class Task:
    project: int
    task: int
    backend: int
    scene: scenes.Scene
    png: bytes

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.scene.image.shape[:2]
        return width, height


def labeling_task(driver: Driver, backend: Server, tmp_path: Path, label_config: str) -> Task:
    """A project with ``label_config``, one uploaded scene image as its task, and the backend connected."""
    scene = scenes.generate_scene(SEED)
    png = png_bytes(scene.image)
    (tmp_path / "scene.png").write_bytes(png)
    project = driver("create_project", title=tmp_path.name, label_config=label_config)
    [task] = driver("upload", project=project, path=str(tmp_path / "scene.png"))
    return Task(project, task, driver("add_backend", project=project, url=backend.url), scene, png)


def click_context(task: Task, x: float, y: float) -> dict[str, Any]:
    """What the editor sends for a smart keypoint: percent of the image, ``is_positive`` at the top."""
    width, height = task.size
    return {"result": [{"original_width": width, "original_height": height, "image_rotation": 0,
                        "value": {"x": x / width * 100, "y": y / height * 100, "width": 0.5,
                                  "keypointlabels": ["Object"]},
                        "is_positive": True, "id": "click1", "from_name": "point", "to_name": "image",
                        "type": "keypointlabels", "origin": "manual"}]}


def box_context(task: Task, box: tuple[float, float, float, float]) -> dict[str, Any]:
    width, height = task.size
    x0, y0, x1, y1 = box
    return {"result": [{"original_width": width, "original_height": height, "image_rotation": 0,
                        "value": {"x": x0 / width * 100, "y": y0 / height * 100, "width": (x1 - x0) / width * 100,
                                  "height": (y1 - y0) / height * 100, "rotation": 0, "rectanglelabels": ["Object"]},
                        "id": "box1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
                        "origin": "manual"}]}


def decoded(region: dict[str, Any]) -> np.ndarray:
    """A brush region's mask, decoded by Label Studio's own converter."""
    height, width = region["original_height"], region["original_width"]
    return np.reshape(brush.decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3] > 0


def best_mask(gateway: GatewayProcess, task: Task, prompt: PromptSpec) -> np.ndarray:
    with SamServeClient(gateway.target) as client:
        [answer] = client.segment(task.png, [prompt])
    return answer.masks[int(np.argmax(answer.predicted_iou))]


def test_interactive_brushes_are_segment_masks_and_label_studio_stores_them(
        driver: Driver, backend: Server, scenes_gateway: GatewayProcess, tmp_path: Path) -> None:
    task = labeling_task(driver, backend, tmp_path, BRUSH_CONFIG)
    target = task.scene.instances[0].mask
    x, y = scenes.farthest_interior_point(target)
    box = scenes.tight_box(target)
    asked = {
        "click": (click_context(task, x, y), PromptSpec(points=[(x, y)], labels=[1], multimask_output=True)),
        "box": (box_context(task, box), PromptSpec(box=box, multimask_output=False)),
    }
    for name, (context, prompt) in asked.items():
        relayed = driver("interactive", backend=task.backend, task=task.task, context=context)
        [region] = relayed["data"]["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == ("mask", "image", "brushlabels")
        assert region["value"]["brushlabels"] == ["Object"]
        expected = best_mask(scenes_gateway, task, prompt)
        assert expected.sum() > 50, f"{name}: Segment's mask is (nearly) empty: nothing to compare"
        assert evaluation.iou(decoded(region), expected) >= 0.999, name
        assert evaluation.iou(expected, target) > 0.5, f"{name}: the prompt missed its object"
        # Accepted by Label Studio: stored as a prediction, read back unchanged.
        stored = driver("create_prediction", task=task.task, result=relayed["data"]["result"],
                        score=relayed["data"]["score"], model_version=relayed["data"]["model_version"])
        [read] = [p for p in driver("predictions", task=task.task) if p["id"] == stored]
        np.testing.assert_array_equal(decoded(read["result"][0]), decoded(region))


def test_interactive_polygons_are_segments_polygon_answer(
        driver: Driver, backend: Server, scenes_gateway: GatewayProcess, tmp_path: Path) -> None:
    task = labeling_task(driver, backend, tmp_path, POLYGON_CONFIG)
    width, height = task.size
    x, y = scenes.farthest_interior_point(task.scene.instances[1].mask)
    relayed = driver("interactive", backend=task.backend, task=task.task, context=click_context(task, x, y))
    regions = relayed["data"]["result"]
    assert regions and all(r["type"] == "polygonlabels" and r["from_name"] == "mask" for r in regions)
    with SamServeClient(scenes_gateway.target) as client:
        [answer] = client.segment(task.png, [PromptSpec(points=[(x, y)], labels=[1])],
                                  encoding=pb.MASK_ENCODING_POLYGON)
        [as_mask] = client.segment(task.png, [PromptSpec(points=[(x, y)], labels=[1])])
    best = int(np.argmax(answer.predicted_iou))
    assert answer.polygons is not None
    exteriors = polygons.coco_segmentation(answer.polygons[best])
    assert len(regions) == len(exteriors)
    for region, ring in zip(regions, exteriors, strict=True):
        np.testing.assert_allclose(np.asarray(region["value"]["points"]) * (width, height) / 100,
                                   np.reshape(ring, (-1, 2)), atol=1e-6)
    drawn = polygons.polygons_to_mask(polygons.PolygonSet(
        [polygons.Ring(ring, "exterior") for ring in exteriors], 0, 0.0, height, width), height, width)
    assert evaluation.iou(drawn, as_mask.masks[best]) >= polygons.MIN_IOU
    stored = driver("create_prediction", task=task.task, result=regions, score=relayed["data"]["score"],
                    model_version=relayed["data"]["model_version"])
    [read] = [p for p in driver("predictions", task=task.task) if p["id"] == stored]
    assert [r["value"]["points"] for r in read["result"]] == [r["value"]["points"] for r in regions]


def test_retrieved_predictions_are_generate_masks_and_an_unreadable_image_fails_only_its_task(
        driver: Driver, backend: Server, scenes_gateway: GatewayProcess, tmp_path: Path) -> None:
    task = labeling_task(driver, backend, tmp_path, BRUSH_CONFIG)
    [missing] = driver("import_tasks", project=task.project,
                       tasks=[{"image": f"/data/upload/{task.project}/no-such-image.png"}])
    driver("retrieve_predictions", project=task.project, tasks=[task.task, missing])
    [stored] = wait_until(lambda: driver("predictions", task=task.task), bool, "the stored prediction", 60)
    assert driver("predictions", task=missing) == []
    with SamServeClient(scenes_gateway.target) as client:
        expected = client.generate_masks(task.png, **GENERATE).masks()
    assert len(expected) > 0, "GenerateMasks kept no mask: nothing to compare"
    assert len(stored["result"]) == len(expected)
    for region, mask in zip(stored["result"], expected, strict=True):
        assert evaluation.iou(decoded(region), mask) >= 0.999
    # What Label Studio received for the two tasks: a prediction, and the other task's reason.
    tasks = [{"id": task.task, "data": driver("task_data", task=task.task)},
             {"id": missing, "data": driver("task_data", task=missing)}]
    reply = httpx.post(f"{backend.url}/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG,
                                                       "project": f"{task.project}.0", "params": {"context": None}},
                       timeout=120).json()
    assert len(reply["results"]) == 2 and len(reply["results"][0]["result"]) == len(expected)
    failed = reply["results"][1]
    assert "result" not in failed and failed["task"] == missing  # Label Studio stores nothing for it
    assert re.search(r"no-such-image\.png: Label Studio answered HTTP [45]\d\d", failed["error"]), failed


def test_an_unsupported_labeling_config_is_refused_at_setup_naming_the_tag(
        driver: Driver, backend: Server) -> None:
    config = BRUSH_CONFIG.replace("</View>", '<Choices name="quality" toName="image"><Choice value="good"/>'
                                             "</Choices></View>")
    direct = httpx.post(f"{backend.url}/setup", json={"project": "1.0", "schema": config}, timeout=10)
    assert direct.status_code == 422 and '<Choices name="quality">' in direct.json()["error"]
    project = driver("create_project", title="unsupported", label_config=config)
    refused = driver.answer("add_backend", project=project, url=backend.url)
    assert refused.get("error", {}).get("status") == 400, refused
    assert "/setup" in json.dumps(refused["error"]["body"])
    assert '<Choices name="quality">' in backend.log()


def test_a_personal_access_token_reads_the_task_image(
        driver: Driver, backend: Server, label_studio: Server, scenes_gateway: GatewayProcess, tmp_path: Path) -> None:
    """With a personal access token (a JWT, exchanged at /api/token/refresh/) in place of the legacy token."""
    task = labeling_task(driver, backend, tmp_path, BRUSH_CONFIG)
    token = driver("personal_token")
    assert token.count(".") == 2, "not a JWT"
    personal = start_backend(scenes_gateway, label_studio, token, tmp_path)
    try:
        x, y = scenes.farthest_interior_point(task.scene.instances[0].mask)
        reply = httpx.post(f"{personal.url}/predict", timeout=120, json={
            "tasks": [{"id": task.task, "data": driver("task_data", task=task.task)}], "label_config": BRUSH_CONFIG,
            "project": f"{task.project}.0", "params": {"context": click_context(task, x, y)}}).json()
    finally:
        personal.stop()
    [answer] = reply["results"]
    assert "error" not in answer, answer
    expected = best_mask(scenes_gateway, task, PromptSpec(points=[(x, y)], labels=[1]))
    assert evaluation.iou(decoded(answer["result"][0]), expected) >= 0.999
