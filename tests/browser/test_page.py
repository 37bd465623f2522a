"""The web page in chromium against the real gateway: what it draws equals the gateway's own answers.

Masks decoded in the browser (onnxruntime-web, web/src/samclient.js) are compared with the gateway's Segment masks
over gRPC for the same prompts (IoU >= 0.99; they are in fact pixel-identical on this model), "segment everything"
with GenerateMasks, and the downloads are decoded with pycocotools and Pillow."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samserve.core.api import pb, pb_grpc
from samserve.security import key_file
from samserve.vision import polygons
from samserve_build import scenes
from samserve_dev.browser import (
    DEMO_SCENE,
    DEMO_SCENE_INDEX,
    DEMO_SCENE_SIZE,
    canvas_pixels,
    click_image,
    counters,
    drawn_mask,
    iou,
    screen_point,
    upload,
    wait_state,
)
from samserve_dev.local_stack import GatewayProcess

MIN_IOU = 0.99
SCORE_TOLERANCE = 1e-3
LABELS = {1: pb.POINT_LABEL_FOREGROUND, 0: pb.POINT_LABEL_BACKGROUND}


@pytest.fixture(scope="module")
def stub(web_gateway: GatewayProcess) -> Iterator[pb_grpc.SegmentAnythingStub]:
    with web_gateway.channel() as channel:
        yield pb_grpc.SegmentAnythingStub(channel)


@pytest.fixture(scope="module")
def demo_scene() -> scenes.Scene:
    return scenes.generate_scene(scenes.EVAL_SEED_OFFSET + DEMO_SCENE_INDEX, size=DEMO_SCENE_SIZE)


@pytest.fixture(scope="module")
def object_points(demo_scene: scenes.Scene) -> list[tuple[float, float]]:
    """One point well inside each object of the demo scene (largest objects first)."""
    ordered = sorted(demo_scene.instances, key=lambda instance: -instance.area)
    return [scenes.farthest_interior_point(instance.mask) for instance in ordered]


def _prompt_message(prompt: dict) -> pb.Prompt:
    """The page's prompt form ({points: [{x, y, label}], box, multimask}) as the API's Prompt."""
    message = pb.Prompt(multimask_output=bool(prompt.get("multimask", True)))
    for point in prompt.get("points") or []:
        message.points.add(x=point["x"], y=point["y"], label=LABELS[point["label"]])
    if prompt.get("box"):
        x0, y0, x1, y1 = prompt["box"]
        message.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return message


def _server_masks(stub: pb_grpc.SegmentAnythingStub, image_id: str, prompts: list[dict]) -> list[list[pb.Mask]]:
    response = stub.Segment(pb.SegmentRequest(image_id=image_id, prompts=[_prompt_message(p) for p in prompts],
                                              mask_encoding=pb.MASK_ENCODING_RLE), timeout=120)
    return [list(result.masks) for result in response.results]


def _decode_rle(rle: pb.CocoRle | dict) -> np.ndarray:
    if isinstance(rle, dict):
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    return mask_utils.decode({"size": list(rle.size), "counts": rle.counts}).astype(bool)


def _page_mask(page) -> tuple[np.ndarray, dict]:
    current = page.evaluate("window.samserveApp.currentMask()")
    mask = np.array(current["mask"], dtype=bool).reshape(current["height"], current["width"])
    return mask, current


def test_the_demo_scene_is_the_generators(demo_scene: scenes.Scene) -> None:
    """web/demo.png is what web/demo_scene.py makes (the points below are its objects)."""
    assert np.array_equal(np.asarray(Image.open(DEMO_SCENE).convert("RGB")), demo_scene.image)


def test_the_page_loads_everything_from_the_gateway(browser, web_gateway: GatewayProcess) -> None:
    context = browser.new_context()
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(web_gateway.http_url + "/")
    wait_state(page, "idle")
    assert page.title().startswith("samserve")
    page.click("#demo")
    wait_state(page, "ready")
    history = page.evaluate("window.samserveApp.history()")
    assert history["states"] == ["idle", "loading", "embedding", "ready"]
    assert [stage.split()[0] for stage in history["progress"]] == ["Uploading", "Embedding", "Downloading", "Loading"]
    assert page.locator("#progress-box").is_hidden()
    assert all(url.startswith(web_gateway.http_url) for url in requests), requests
    wasm = page.request.get(web_gateway.http_url + "/ort-wasm-simd-threaded.wasm")
    assert wasm.ok and wasm.headers["content-type"] == "application/wasm"
    assert any(url.endswith("/decoder.onnx") for url in requests)
    # cross-origin isolated (the gateway's COOP/COEP headers): the decoder runs on several wasm threads, each
    # loading onnxruntime-web's glue module from the gateway too
    assert page.evaluate("self.crossOriginIsolated")
    threads = page.evaluate("window.samserveApp.lib.samclient.defaultThreads()")
    assert threads == min(4, page.evaluate("navigator.hardwareConcurrency"))
    assert threads == 1 or any(url.endswith("/ort-wasm-simd-threaded.mjs") for url in requests)
    context.close()


def test_a_click_draws_the_servers_mask(page, stub, object_points) -> None:
    """Upload the demo scene, click an object: the mask drawn on the canvas is the server's (same mask token), and
    the multimask choices carry the server's scores."""
    image = upload(page)
    x, y = object_points[0]
    click_image(page, x, y)
    mask, current = _page_mask(page)
    drawn = drawn_mask(page)
    assert np.array_equal(drawn, mask)
    prompt = page.evaluate("window.samserveApp.prompt()")
    assert len(prompt["points"]) == 1 and prompt["multimask"]
    (server,) = _server_masks(stub, image["imageId"], [prompt])
    by_token = {m.token_index: m for m in server}
    assert sorted(by_token) == current["tokens"] == [1, 2, 3]
    assert iou(drawn, _decode_rle(by_token[current["token"]].rle)) >= MIN_IOU
    for token, score in zip(current["tokens"], current["scores"], strict=True):
        assert abs(by_token[token].predicted_iou - score) <= SCORE_TOLERANCE
    assert current["selected"] == int(np.argmax(current["scores"]))
    choices = page.locator("#choices [role=radio]")
    assert choices.count() == 3
    assert f"{current['score']:.3f}" in choices.nth(current["selected"]).text_content()


def test_the_module_decodes_the_servers_masks(page, stub, object_points) -> None:
    """samclient.js on ~20 point / box / multimask prompts equals the server's Segment masks (IoU >= 0.99 each)."""
    page.click("#demo")
    wait_state(page, "ready")
    image = page.evaluate("window.samserveApp.image()")
    width, height = image["width"], image["height"]
    rng = np.random.default_rng(16)

    def inside(x: float, y: float) -> tuple[float, float]:  # the API refuses coordinates outside the image
        return float(np.clip(x, 0, width - 1)), float(np.clip(y, 0, height - 1))

    def around(x: float, y: float) -> list[float]:
        return [*inside(x - rng.uniform(10, 60), y - rng.uniform(10, 60)),
                *inside(x + rng.uniform(10, 60), y + rng.uniform(10, 60))]

    prompts: list[dict] = []
    for k in range(20):
        x, y = inside(*(np.asarray(object_points[k % len(object_points)]) + rng.uniform(-3, 3, 2)))
        point = {"x": x, "y": y, "label": 1}
        kind = k % 4
        if kind == 0:      # one click: the three multimask answers
            prompts.append({"points": [point], "multimask": True})
        elif kind == 1:    # one click: the single-mask answer
            prompts.append({"points": [point], "multimask": False})
        elif kind == 2:    # a box around an object, multimask or not
            prompts.append({"box": around(x, y), "multimask": k % 8 == 2})
        else:              # a foreground and a background point with a box
            bx, by = inside(rng.uniform(0, width), rng.uniform(0, height))
            prompts.append({"points": [point, {"x": bx, "y": by, "label": 0}], "box": around(x, y),
                            "multimask": False})
    decoded = page.evaluate("""async (prompts) => {
        const app = window.samserveApp;
        const decoder = await app.decoder();
        const out = [];
        for (const prompt of prompts) {
            const r = await decoder.decode(app.embedding(), {...prompt, box: prompt.box ?? undefined});
            out.push({scores: r.scores, tokens: r.tokens,
                      masks: r.masks.map((m) => app.lib.samclient.bytesToBase64(m))});
        }
        return out;
    }""", prompts)
    server = _server_masks(stub, image["imageId"], prompts)
    ious = []
    for prompt, mine, theirs in zip(prompts, decoded, server, strict=True):
        assert mine["tokens"] == [m.token_index for m in theirs], prompt
        for encoded, score, reference in zip(mine["masks"], mine["scores"], theirs, strict=True):
            local = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).reshape(height, width).astype(bool)
            ious.append(iou(local, _decode_rle(reference.rle)))
            assert ious[-1] >= MIN_IOU, (prompt, ious[-1])
            assert abs(score - reference.predicted_iou) <= SCORE_TOLERANCE
    assert len(prompts) == 20 and len(ious) >= 30
    print(f"client vs server masks: {len(ious)} masks, min IoU {min(ious):.5f}, mean {np.mean(ious):.5f}")


def test_box_choices_and_keyboard(page, stub, object_points) -> None:
    """Dragging draws a box (the server's box mask); a right click adds a background point; 1-3 pick a choice;
    Ctrl+Z / U undo; Escape / C clear; arrows and Enter place points."""
    image = upload(page)
    x, y = object_points[0]
    click_image(page, x, y)
    page.keyboard.press("2")
    page.wait_for_function("window.samserveApp.currentMask().selected === 1")
    mask, current = _page_mask(page)
    assert np.array_equal(drawn_mask(page), mask) and current["token"] == 2

    bx, by = object_points[1]
    click_image(page, bx, by, button="right")
    prompt = page.evaluate("window.samserveApp.prompt()")
    assert [p["label"] for p in prompt["points"]] == [1, 0] and not prompt["multimask"]
    (server,) = _server_masks(stub, image["imageId"], [prompt])
    assert iou(drawn_mask(page), _decode_rle(server[0].rle)) >= MIN_IOU

    page.keyboard.press("Control+z")
    page.wait_for_function("window.samserveApp.prompt().points.length === 1")
    page.keyboard.press("Escape")
    page.wait_for_function("window.samserveApp.prompt() === null")
    assert not drawn_mask(page).any()

    before = counters(page)["commits"]
    start = screen_point(page, x - 40, y - 40)
    end = screen_point(page, x + 40, y + 40)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=5)
    page.mouse.up()
    page.wait_for_function("(n) => window.samserveApp.counters().commits > n", arg=before)
    wait_state(page, "ready")
    prompt = page.evaluate("window.samserveApp.prompt()")
    assert prompt["box"] is not None and not prompt["points"]
    (server,) = _server_masks(stub, image["imageId"], [prompt])
    assert iou(drawn_mask(page), _decode_rle(server[0].rle)) >= MIN_IOU

    page.keyboard.press("u")
    page.wait_for_function("window.samserveApp.prompt() === null")
    page.focus("#stage")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_function("window.samserveApp.prompt()?.points.length === 1")
    page.keyboard.press("c")
    page.wait_for_function("window.samserveApp.prompt() === null")


def test_hover_previews_the_mask(page, stub, object_points) -> None:
    """An image dropped on the page is embedded; hovering decodes in the browser and draws a preview that is the
    server's best mask for that point (Segment, multimask, the highest predicted IoU); its latency is logged."""
    page.evaluate("""async () => {
        const blob = await (await fetch('demo.png')).blob();
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.getElementById('stage').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""")
    wait_state(page, "ready")
    assert "dropped.png" in page.text_content("#status")
    x, y = object_points[0]
    page.mouse.move(*screen_point(page, x, y))
    page.wait_for_function("window.samserveApp.counters().hoverDraws >= 1")
    preview = canvas_pixels(page, "#overlay-layer")[..., 3] > 0  # no prompt yet: no markers, only the preview
    hovered = page.evaluate("window.samserveApp.latencyLog()")[-1]  # where the drawn preview was decoded
    image_id = page.evaluate("window.samserveApp.image().imageId")
    (server,) = _server_masks(stub, image_id, [{"points": [{"x": hovered["x"], "y": hovered["y"], "label": 1}],
                                                "multimask": True}])
    best = max(server, key=lambda mask: mask.predicted_iou)
    expected = _decode_rle(best.rle)
    assert expected.sum() > 50, "the server's mask is (nearly) empty: this compares nothing"
    assert iou(preview, expected) >= MIN_IOU
    latencies = page.evaluate("window.samserveApp.latencies()")
    assert latencies and all(ms > 0 for ms in latencies)


def test_segment_everything_and_downloads(page, stub, tmp_path: Path) -> None:
    """Segment everything draws every GenerateMasks mask in its own colour; the COCO JSON download decodes to the
    server's masks and the PNG to their union."""
    image = upload(page)
    page.click("#everything")
    wait_state(page, "everything-ready", timeout_ms=300_000)
    parameters = page.evaluate("window.samserveApp.everythingParameters()")
    assert parameters == {"maskEncoding": "MASK_ENCODING_RLE", "pointsPerSide": 32, "predIouThresh": 0.2,
                          "stabilityScoreThresh": 0.5}  # the shipped model's card thresholds, prefilled
    server = stub.GenerateMasks(pb.GenerateMasksRequest(
        image_id=image["imageId"], mask_encoding=pb.MASK_ENCODING_RLE, points_per_side=parameters["pointsPerSide"],
        pred_iou_thresh=parameters["predIouThresh"], stability_score_thresh=parameters["stabilityScoreThresh"]),
        timeout=300)
    everything = page.evaluate("window.samserveApp.everything()")
    assert len(server.masks) > 1
    assert everything["count"] == len(server.masks)
    colours = [tuple(c) for c in everything["colors"]]
    assert len(set(colours)) == len(colours)
    # The page paints the masks largest first (smaller, often nested, masks on top), each in its colour: the canvas
    # is exactly that composite of the server's masks.
    masks = [_decode_rle(m.rle) for m in server.masks]
    expected = np.zeros((*masks[0].shape, 4), dtype=np.uint8)
    for colour, index in zip(colours, sorted(range(len(masks)), key=lambda i: -server.masks[i].area), strict=True):
        expected[masks[index]] = (*colour, 255)
    assert np.array_equal(canvas_pixels(page, "#mask-layer"), expected)

    with page.expect_download() as download_info:
        page.click("#download-coco")
    path = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(path)
    coco = json.loads(path.read_text())
    assert coco["images"][0]["width"] == image["width"] and coco["images"][0]["height"] == image["height"]
    mine = sorted(_decode_rle(a["segmentation"]).tobytes() for a in coco["annotations"])
    theirs = sorted(_decode_rle(m.rle).tobytes() for m in server.masks)
    assert mine == theirs
    for annotation in coco["annotations"]:
        assert annotation["area"] == int(mask_utils.area({**annotation["segmentation"],
                                                          "counts": annotation["segmentation"]["counts"].encode()}))

    with page.expect_download() as download_info:
        page.click("#download-png")
    png = np.asarray(Image.open(io.BytesIO(Path(download_info.value.path()).read_bytes())).convert("RGB"))
    union = np.logical_or.reduce([_decode_rle(m.rle) for m in server.masks])
    assert np.array_equal(png.any(axis=-1), union)

    # COCO polygons of every mask, asked of GenerateMasks again: one per server mask, in its order
    with page.expect_download() as download_info:
        page.click("#download-polygons")
    outlined = json.loads(Path(download_info.value.path()).read_text())["annotations"]
    assert [a["area"] for a in outlined] == [int(m.area) for m in server.masks]
    for annotation, reference in zip(outlined, server.masks, strict=True):
        rings = [polygons.Ring(ring["points"], ring["role"], ring["parent"]) for ring in annotation["rings"]]
        drawn = polygons.polygons_to_mask(polygons.PolygonSet(rings, 0, 0.0, *masks[0].shape), *masks[0].shape)
        assert iou(drawn, _decode_rle(reference.rle)) == pytest.approx(annotation["polygon_iou"], abs=1e-6)
        assert annotation["polygon_iou"] >= polygons.MIN_IOU


def test_clicked_mask_downloads(page, stub, object_points, tmp_path: Path) -> None:
    """The COCO JSON and PNG of a clicked mask are the drawn mask (and so the server's)."""
    image = upload(page)
    x, y = object_points[2]
    click_image(page, x, y)
    mask, current = _page_mask(page)
    with page.expect_download() as download_info:
        page.click("#download-coco")
    coco = json.loads(Path(download_info.value.path()).read_text())
    (annotation,) = coco["annotations"]
    assert np.array_equal(_decode_rle(annotation["segmentation"]), mask)
    assert annotation["area"] == int(mask.sum()) and annotation["mask_token"] == current["token"]
    (server,) = _server_masks(stub, image["imageId"], [page.evaluate("window.samserveApp.prompt()")])
    reference = next(m for m in server if m.token_index == current["token"])
    assert iou(_decode_rle(annotation["segmentation"]), _decode_rle(reference.rle)) >= MIN_IOU
    x0, y0, w, h = annotation["bbox"]
    assert [x0, y0, w, h] == [float(v) for v in mask_utils.toBbox(
        {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()})]

    with page.expect_download() as download_info:
        page.click("#download-png")
    png = np.asarray(Image.open(Path(download_info.value.path())).convert("L"))
    assert np.array_equal(png > 127, mask)

    # COCO polygons, made by the server for the same prompt: they outline the drawn mask
    with page.expect_download() as download_info:
        page.click("#download-polygons")
    assert download_info.value.suggested_filename.endswith(".polygons.coco.json")
    (outlined,) = json.loads(Path(download_info.value.path()).read_text())["annotations"]
    assert outlined["mask_token"] == current["token"] and outlined["area"] == int(reference.area)
    rings = [polygons.Ring(ring["points"], ring["role"], ring["parent"]) for ring in outlined["rings"]]
    assert outlined["segmentation"] == [ring.points for ring in rings if ring.role == "exterior"]
    drawn = polygons.polygons_to_mask(polygons.PolygonSet(rings, 0, 0.0, *mask.shape), *mask.shape)
    assert outlined["polygon_iou"] >= polygons.MIN_IOU
    assert iou(drawn, _decode_rle(reference.rle)) == pytest.approx(outlined["polygon_iou"], abs=1e-6)
    assert iou(drawn, mask) >= polygons.MIN_IOU * MIN_IOU


def test_a_bearer_token_from_the_page(browser, browser_triton, tmp_path: Path, object_points) -> None:
    """With auth on, the page is refused (401, said on the page) until its token is given; then it works."""
    keys = tmp_path / "keys.json"
    _, token = key_file.add_key(keys, "browser")
    with GatewayProcess(browser_triton.url, None, tmp_path, auth="api-keys", api_keys_file=keys,
                        client_decoder_dir=browser_triton.model.directory) as gateway:
        context = browser.new_context()
        page = context.new_page()
        page.goto(gateway.http_url + "/")
        wait_state(page, "idle")
        page.click("#demo")
        page.wait_for_function("document.body.dataset.state === 'error'")
        assert "401" in page.text_content("#status")
        page.click("details summary")
        page.fill("#token", token)
        page.press("#token", "Enter")
        page.click("#demo")
        wait_state(page, "ready")
        click_image(page, *object_points[0])
        assert drawn_mask(page).any()
        context.close()
