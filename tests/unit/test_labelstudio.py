"""The Label Studio backend's pure parts: the labeling config, the context as a prompt, masks as regions, and where
task images may come from. The backend against a real Label Studio: tests/integration/test_labelstudio.py."""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from label_studio_converter import brush

from samserve.labelstudio import config as labeling
from samserve.labelstudio.images import ImageSource, ImageUnavailable
from samserve.labelstudio.prompts import BadContext, prompt_from_context
from samserve.labelstudio.regions import brush_region, polygon_regions, prediction
from samserve.labelstudio.settings import LabelStudioSettings

SAM_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="Banana"/><Label value="Orange"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Banana" smart="true"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true"><Label value="Orange"/></RectangleLabels>
</View>"""


def with_extra(tag: str) -> str:
    return SAM_CONFIG.replace("</View>", f"{tag}</View>")


def test_the_sam_config_gives_the_image_the_answering_control_and_the_prompts() -> None:
    config = labeling.parse(SAM_CONFIG)
    assert (config.image_name, config.image_key, config.answer_type) == ("image", "image", "brushlabels")
    assert config.answer.labels == ("Banana", "Orange") and set(config.prompts) == {"tag2", "tag3"}
    assert config.label_for("Orange") == "Orange" and config.label_for("Apple") == "Banana"
    assert labeling.parse(SAM_CONFIG.replace("BrushLabels", "PolygonLabels")).answer_type == "polygonlabels"


@pytest.mark.parametrize(("schema", "named"), [
    (with_extra('<Choices name="quality" toName="image"><Choice value="ok"/></Choices>'), '<Choices name="quality">'),
    (with_extra('<EllipseLabels name="round" toName="image"><Label value="x"/></EllipseLabels>'),
     '<EllipseLabels name="round">'),
    (with_extra('<Image name="second" value="$other"/>'), '<Image name="second">'),
    (with_extra('<Text name="caption" value="$text"/>'), '<Text name="caption">'),
    (SAM_CONFIG.replace('<BrushLabels name="tag" toName="image">', '<BrushLabels name="tag" toName="other">'),
     '<BrushLabels name="tag">'),
    ('<View><Image name="image" value="$image"/><KeyPointLabels name="k" toName="image"><Label value="a"/>'
     "</KeyPointLabels></View>", "no <BrushLabels> or <PolygonLabels>"),
    ('<View><Text name="t" value="$text"/></View>', "no <Image>"),
    ("<View><Image", "not XML"),
])
def test_an_unsupported_config_is_refused_naming_the_tag(schema: str, named: str) -> None:
    with pytest.raises(labeling.UnsupportedConfig, match=re.escape(named)):
        labeling.parse(schema)


def region(kind: str, from_name: str, value: dict, **extra: object) -> dict:
    return {"type": kind, "from_name": from_name, "to_name": "image", "original_width": 200, "original_height": 100,
            "value": value, **extra}


def test_context_points_and_boxes_become_a_prompt_in_pixels() -> None:
    config = labeling.parse(SAM_CONFIG)
    click = region("keypointlabels", "tag2", {"x": 25.0, "y": 50.0, "keypointlabels": ["Banana"]}, is_positive=True)
    single = prompt_from_context({"result": [click]}, config, 200, 100)
    assert single.prompt.points == [(50.0, 50.0)] and single.prompt.labels == [1]
    assert single.prompt.multimask_output and single.prompt.box is None and single.label == "Banana"
    negative = region("keypointlabels", "tag2", {"x": 10.0, "y": 20.0, "keypointlabels": ["Banana"]},
                      is_positive=False)
    box = region("rectanglelabels", "tag3", {"x": 10.0, "y": 10.0, "width": 50.0, "height": 80.0,
                                             "rectanglelabels": ["Orange"]})
    both = prompt_from_context({"result": [click, negative, box]}, config, 200, 100)
    assert both.prompt.labels == [1, 0] and both.prompt.box == (20.0, 10.0, 120.0, 90.0)
    assert not both.prompt.multimask_output and both.label == "Orange"


@pytest.mark.parametrize(("context", "says"), [
    ({"result": []}, "non-empty list"),
    ({"result": [region("brushlabels", "tag", {})]}, r"result\[0\]: type 'brushlabels'"),
    ({"result": [region("keypointlabels", "elsewhere", {"x": 1, "y": 1})]}, "from_name 'elsewhere'"),
    ({"result": [region("keypointlabels", "tag2", {"x": "1", "y": 1})]}, r"result\[0\]\.value\.x"),
    ({"result": [region("keypointlabels", "tag2", {"x": float("nan"), "y": 1})]}, r"value\.x"),
])
def test_a_context_that_is_no_prompt_is_refused_saying_where(context: dict, says: str) -> None:
    with pytest.raises(BadContext, match=says):
        prompt_from_context(context, labeling.parse(SAM_CONFIG), 200, 100)


def test_a_brush_is_label_studios_rle_of_the_mask() -> None:
    mask = np.zeros((37, 53), bool)
    mask[5:20, 7:40] = True
    mask[10:12, 10:12] = False  # a hole
    result = brush_region(labeling.parse(SAM_CONFIG), mask, "Banana", 0.9)
    assert (result["from_name"], result["to_name"], result["type"]) == ("tag", "image", "brushlabels")
    assert (result["original_width"], result["original_height"]) == (53, 37)
    decoded = np.reshape(brush.decode_rle(result["value"]["rle"]), (37, 53, 4))[:, :, 3]
    np.testing.assert_array_equal(decoded > 0, mask)
    assert result["value"]["brushlabels"] == ["Banana"]
    assert prediction([result, {**result, "score": 0.5}], "v1") == {
        "result": [result, {**result, "score": 0.5}], "score": pytest.approx(0.7), "model_version": "v1"}


def test_polygons_are_one_region_per_part_in_percent() -> None:
    config = labeling.parse(SAM_CONFIG.replace("BrushLabels", "PolygonLabels"))
    regions = polygon_regions(config, [[0, 0, 100, 0, 100, 50], [150, 50, 200, 100, 150, 100]], 200, 100, "Banana",
                              0.8)
    assert [r["value"]["points"] for r in regions] == [[[0, 0], [50, 0], [50, 50]], [[75, 50], [100, 100], [75, 100]]]
    assert all(r["type"] == "polygonlabels" and r["value"]["closed"] for r in regions)


def test_images_come_from_label_studio_or_its_local_files_folder_only(tmp_path: Path) -> None:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "a.png").write_bytes(b"png bytes")
    (tmp_path / "secret.png").write_bytes(b"secret")
    source = ImageSource(LabelStudioSettings(url="http://ls.example:8080", local_files_root=tmp_path / "root",
                                             max_image_bytes=16))
    assert source.read("/data/local-files/?d=sub/a.png") == b"png bytes"
    refused = {
        "/data/local-files/?d=../secret.png": "outside",
        "/data/local-files/?d=sub/missing.png": "No such file",
        "http://elsewhere.example/a.png": "fetches nothing else",
        "https://ls.example:8080/data/upload/1/a.png": "fetches nothing else",  # another scheme
        "a.png": "neither a Label Studio path",
    }
    for reference, says in refused.items():
        with pytest.raises(ImageUnavailable, match=says):
            source.read(reference)
    (tmp_path / "root" / "big.png").write_bytes(b"x" * 17)
    with pytest.raises(ImageUnavailable, match="MAX_IMAGE_BYTES=16"):
        source.read("/data/local-files/?d=big.png")
    without = ImageSource(LabelStudioSettings())
    with pytest.raises(ImageUnavailable, match="SAMSERVE_LABELSTUDIO_URL is unset"):
        without.read("/data/upload/1/a.png")
    with pytest.raises(ImageUnavailable, match="LOCAL_FILES_ROOT is unset"):
        without.read("/data/local-files/?d=a.png")


class _LabelStudioStandIn(http.server.BaseHTTPRequestHandler):
    """A plain HTTP server on loopback with the answers Label Studio can give an image read."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        # Recorded before answering: the client may check the list as soon as it has the body.
        self.server.authorizations.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        body = {"/data/upload/1/ok.png": b"png bytes", "/data/upload/1/big.png": b"x" * 17}.get(self.path)
        if self.path == "/data/upload/1/moved.png":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.example/a.png")
            self.end_headers()
            return
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


def test_images_are_read_from_label_studio_with_its_token_and_no_redirect_is_followed() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudioStandIn)
    server.authorizations = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    source = ImageSource(LabelStudioSettings(url=url, api_key="legacy-key", max_image_bytes=16))
    try:
        assert source.read("/data/upload/1/ok.png") == b"png bytes"
        assert source.read(f"{url}/data/upload/1/ok.png") == b"png bytes"
        assert server.authorizations == ["Token legacy-key"] * 2  # type: ignore[attr-defined]
        with pytest.raises(ImageUnavailable, match="follows no redirect"):
            source.read("/data/upload/1/moved.png")
        with pytest.raises(ImageUnavailable, match="MAX_IMAGE_BYTES=16"):
            source.read("/data/upload/1/big.png")
        with pytest.raises(ImageUnavailable, match="answered HTTP 404"):
            source.read("/data/upload/1/missing.png")
    finally:
        source.close()
        server.shutdown()
        server.server_close()
