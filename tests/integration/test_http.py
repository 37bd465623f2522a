"""The HTTP/JSON transport against a real gateway process (real Triton, real Redis): every answer equals the gRPC
answer byte for byte once decoded, every error has its HTTP twin, and images arrive as JSON, raw bytes or
multipart. One servicer, two transports: the gRPC side of each comparison is the same gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format, message
from google.rpc import error_details_pb2, status_pb2

from samserve.core.api import UNARY_METHOD_NAMES, pb, pb_grpc
from samserve.security.tls import client_channel
from samserve.transport.http.routes import http_routes
from samserve.transport.http.transcoding import HTTP_STATUS
from samserve_dev.images import new_image
from samserve_dev.local_stack import GatewayProcess
from samserve_dev.metrics import sample, scrape

SAMSERVE = str(Path(sys.executable).parent / "samserve")
FG, BG = pb.POINT_LABEL_FOREGROUND, pb.POINT_LABEL_BACKGROUND


@pytest.fixture(scope="module")
def http_gateway(module_gateway_factory, tiny_triton, tiny_model, redis_server) -> GatewayProcess:
    return module_gateway_factory(tiny_triton.url, redis_server.url, client_decoder_dir=tiny_model.directory,
                                  max_generate_decoder_prompts=5000)


@pytest.fixture(scope="module")
def stub(http_gateway) -> Iterator[pb_grpc.SegmentAnythingStub]:
    with client_channel(http_gateway.target) as channel:
        yield pb_grpc.SegmentAnythingStub(channel)


@pytest.fixture(scope="module")
def http(http_gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_gateway.http_url, timeout=120) as client:
        yield client


def _route(method: str, **path: str) -> tuple[str, str]:
    """(verb, path) of ``method``'s first HTTP binding whose path parameters are exactly ``path``."""
    for route in http_routes():
        if route.method.name == method and set(route.path_fields) == set(path):
            return route.verb, route.template.format(**path)
    raise AssertionError(f"no route of {method} with path parameters {sorted(path)}")


def _as_json(request: message.Message) -> dict:
    return json_format.MessageToDict(request)


def _http_call(http: httpx.Client, method: str, request: message.Message, **headers: str) -> httpx.Response:
    verb, path = _route(method)
    if verb == "GET":
        return http.get(path, params=_as_json(request), headers=headers)
    return http.post(path, json=_as_json(request), headers=headers)


def _same(grpc_answer: message.Message, http_answer: httpx.Response) -> None:
    assert http_answer.status_code == 200, http_answer.text
    decoded = json_format.Parse(http_answer.text, type(grpc_answer)())
    assert decoded.SerializeToString(deterministic=True) == grpc_answer.SerializeToString(deterministic=True)


def test_every_rpc_has_an_http_route_and_an_openapi_operation(http):
    document = http.get("/openapi.json").json()
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert set(UNARY_METHOD_NAMES) <= operations
    for route in http_routes():
        assert route.verb.lower() in document["paths"][route.template]
    schema = document["components"]["schemas"]["samserve.v1.SegmentRequest"]["properties"]
    assert set(schema) == {"imageBytes", "imageId", "prompts", "maskEncoding", "returnLowResLogits",
                           "polygonTolerancePx"}


def _segment_request(image_id: str) -> pb.SegmentRequest:
    return pb.SegmentRequest(image_id=image_id, mask_encoding=pb.MASK_ENCODING_RLE_AND_PNG, return_low_res_logits=True,
                             prompts=[
        pb.Prompt(points=[pb.Point(x=40, y=30, label=FG)], multimask_output=True),
        pb.Prompt(points=[pb.Point(x=80, y=60, label=FG), pb.Point(x=20, y=90, label=BG)]),
        pb.Prompt(box=pb.Box(x0=10, y0=15, x1=120, y1=100)),
    ])


def test_answers_equal_the_grpc_answers_byte_for_byte(stub, http):
    image = new_image()
    embedded = stub.Embed(pb.EmbedRequest(image=image), timeout=120)  # both transports then answer cached=True
    image_id = embedded.image_id
    _same(stub.Embed(pb.EmbedRequest(image=image), timeout=60), _http_call(http, "Embed", pb.EmbedRequest(image=image)))
    segment = _segment_request(image_id)
    _same(stub.Segment(segment, timeout=60), _http_call(http, "Segment", segment))
    generate = pb.GenerateMasksRequest(image_id=image_id, points_per_side=8, pred_iou_thresh=0.0,
                                       stability_score_thresh=0.0)
    generated = stub.GenerateMasks(generate, timeout=120)
    assert generated.masks, "0 masks on both sides would prove nothing"
    _same(generated, _http_call(http, "GenerateMasks", generate))
    embedding = stub.GetEmbedding(pb.GetEmbeddingRequest(image_id=image_id), timeout=60)
    _same(embedding, http.get(_route("GetEmbedding", image_id=image_id)[1]))
    _same(stub.GetModel(pb.GetModelRequest(), timeout=60), http.get(_route("GetModel")[1]))
    path_segment = _route("Segment", image_id=image_id)[1]
    without_id = _as_json(segment)
    del without_id["imageId"]
    _same(stub.Segment(segment, timeout=60), http.post(path_segment, json=without_id))


def test_an_image_arrives_as_json_raw_bytes_or_multipart(stub, http):
    image = new_image()
    expected = stub.Embed(pb.EmbedRequest(image=image), timeout=120)
    _, path = _route("Embed")
    for response in (
        http.post(path, content=image, headers={"content-type": "image/png"}),
        http.post(path, content=image, headers={"content-type": "application/octet-stream"}),
        http.post(path, files={"image": ("scene.png", image, "image/png")}),
    ):
        answer = json_format.Parse(response.text, pb.EmbedResponse())
        assert answer.image_id == expected.image_id and answer.cached and (answer.width, answer.height) == (160, 120)
    segment = pb.SegmentRequest(image_bytes=image, prompts=[pb.Prompt(points=[pb.Point(x=5, y=5, label=FG)])])
    rest = _as_json(segment)
    del rest["imageBytes"]
    multipart = http.post(_route("Segment")[1], files={"image": ("scene.png", image, "image/png")},
                          data={"request": json.dumps(rest)})
    _same(stub.Segment(segment, timeout=60), multipart)


ERROR_CASES: dict[str, tuple[str, message.Message]] = {
    "empty image": ("Embed", pb.EmbedRequest()),
    "undecodable image": ("Embed", pb.EmbedRequest(image=b"not an image at all")),
    "no prompts": ("Segment", pb.SegmentRequest(image_id="0" * 64)),
    "unknown image id": ("Segment", pb.SegmentRequest(image_id="f" * 64, prompts=[
        pb.Prompt(points=[pb.Point(x=1, y=1, label=FG)])])),
    "unlabelled point": ("Segment", pb.SegmentRequest(image_bytes=b"x", prompts=[pb.Prompt(points=[pb.Point()])])),
    "grid outside its domain": ("GenerateMasks", pb.GenerateMasksRequest(image_bytes=b"x", points_per_side=0)),
    "too many decoder prompts": ("GenerateMasks", pb.GenerateMasksRequest(image_bytes=b"x", points_per_side=128,
                                                                           crop_n_layers=1)),
    "embedding of an unknown id": ("GetEmbedding", pb.GetEmbeddingRequest(image_id="e" * 64)),
    "malformed image id": ("Segment", pb.SegmentRequest(image_id="../../etc/passwd", prompts=[
        pb.Prompt(points=[pb.Point(x=1, y=1, label=FG)])])),
    "embedding of a malformed id": ("GetEmbedding", pb.GetEmbeddingRequest(image_id="F" * 64)),
    "decoder of other weights": ("GetDecoder", pb.GetDecoderRequest(weights_sha256="0" * 64)),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_every_grpc_error_has_its_http_twin(stub, http, case):
    method, request = ERROR_CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request, timeout=60)
    code = raised.value.code()
    assert code != grpc.StatusCode.OK
    if method == "GetDecoder":  # its path carries the field
        response = http.get(_route(method, weights_sha256=request.weights_sha256)[1])
    else:
        response = _http_call(http, method, request)
    assert response.status_code == HTTP_STATUS[code], response.text
    body = response.json()
    assert body["code"] == code.value[0] and body["message"] == raised.value.details()
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "F" * 64, "f" * 63, "f" * 65, "not-hex-" * 8])
def test_a_malformed_image_id_is_invalid_argument_naming_the_field(stub, http, image_id):
    """Not 64 lowercase hex digits: never a cache lookup (NOT_FOUND would say "expired, send it again"), but
    INVALID_ARGUMENT with a field violation on image_id, over gRPC and HTTP alike."""
    request = pb.SegmentRequest(image_id=image_id, prompts=[pb.Prompt(points=[pb.Point(x=1, y=1, label=FG)])])
    with pytest.raises(grpc.RpcError) as raised:
        stub.Segment(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(dict(raised.value.trailing_metadata())["grpc-status-details-bin"])
    violations = [violation for detail in status.details if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
                  for violation in _unpacked(detail, error_details_pb2.BadRequest).field_violations]
    assert [violation.field for violation in violations] == ["image_id"]
    response = _http_call(http, "Segment", request)
    assert response.status_code == 400 and response.json()["message"] == raised.value.details()
    assert any(v["field"] == "image_id" for d in response.json()["details"] for v in d.get("fieldViolations", []))


@pytest.mark.parametrize("tolerance", [-0.5, float("nan"), float("inf"), 1e6])
@pytest.mark.parametrize("method", ["Segment", "GenerateMasks"])
def test_a_bad_polygon_tolerance_is_invalid_argument_naming_the_field(stub, http, method, tolerance):
    """Negative, NaN, infinite or absurd: refused before any work, over gRPC and HTTP alike."""
    image = new_image()
    if method == "Segment":
        request = pb.SegmentRequest(image_bytes=image, prompts=[pb.Prompt(points=[pb.Point(x=1, y=1, label=FG)])],
                                    mask_encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=tolerance)
    else:
        request = pb.GenerateMasksRequest(image_bytes=image, points_per_side=4,
                                          mask_encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=tolerance)
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(dict(raised.value.trailing_metadata())["grpc-status-details-bin"])
    violations = [violation for detail in status.details if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
                  for violation in _unpacked(detail, error_details_pb2.BadRequest).field_violations]
    assert [violation.field for violation in violations] == ["polygon_tolerance_px"]
    response = _http_call(http, method, request)
    assert response.status_code == 400 and response.json()["message"] == raised.value.details()
    assert any(v["field"] == "polygon_tolerance_px" for d in response.json()["details"]
               for v in d.get("fieldViolations", []))


def _unpacked(detail, kind):
    unpacked = kind()
    detail.Unpack(unpacked)
    return unpacked


@pytest.mark.parametrize("method", ["Segment", "Embed", "GetModel"])
def test_a_method_a_route_does_not_serve_is_405_with_allow(http, method):
    verb, path = _route(method, **({"image_id": "f" * 64} if method == "Segment" else {}))
    other = "GET" if verb == "POST" else "POST"
    response = http.request(other, path, content=b"{}")
    assert response.status_code == 405, response.text
    assert verb in response.headers["allow"].split(", ") and other not in response.headers["allow"]
    assert response.json()["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0] and other in response.json()["message"]
    assert http.request("DELETE", path).status_code == 405
    assert http.get("/v1/no-such-route").status_code == 404  # a path the API does not have stays 404


def test_a_deadline_over_http_is_the_grpc_deadline(http):
    response = http.post(_route("Embed")[1], content=new_image(), headers={"content-type": "image/png",
                                                                            "x-timeout-s": "0.001"})
    assert response.status_code == 504 and response.json()["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.mark.parametrize(("body", "content_type", "status", "words"), [
    (b"{not json", "application/json", 400, "not a valid EmbedRequest"),
    (b'{"imagez": "AAAA"}', "application/json", 400, "imagez"),
    (b"<xml/>", "text/xml", 415, "unsupported content type"),
])
def test_requests_the_transport_cannot_read_are_refused_with_a_status_body(http, body, content_type, status, words):
    response = http.post(_route("Embed")[1], content=body, headers={"content-type": content_type})
    assert response.status_code == status
    assert response.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and words in response.json()["message"]


def test_the_decoder_route_gives_the_exported_graph_cacheably(http, tiny_model):
    model = http.get("/v1/model").json()
    assert model["weightsSha256"] == tiny_model.metadata.weights_sha256
    assert model["embeddingShape"] == list(tiny_model.metadata.embedding_shape)
    decoder = model["decoder"]
    assert decoder["inputNames"][0] == "image_embeddings" and decoder["outputNames"] == ["low_res_masks",
                                                                                        "iou_predictions"]
    first = http.get(decoder["url"])
    assert first.status_code == 200 and first.content == (tiny_model.directory / "decoder.onnx").read_bytes()
    assert first.headers["content-type"] == "application/octet-stream"
    assert "immutable" in first.headers["cache-control"] and decoder["sizeBytes"] == str(len(first.content))
    again = http.get(decoder["url"], headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_the_embedding_layout_is_what_the_decoder_takes(stub, http, tiny_model):
    import numpy as np

    image = new_image()
    answer = json_format.Parse(http.post(_route("GetEmbedding")[1], content=image,
                                         headers={"content-type": "image/png"}).text, pb.GetEmbeddingResponse())
    embedding = answer.embedding
    assert (embedding.layout_version, embedding.dtype) == (1, "float16")
    assert list(embedding.shape) == [1, *tiny_model.metadata.embedding_shape]
    values = np.frombuffer(embedding.data, dtype="<f2").reshape(embedding.shape)
    assert np.isfinite(values).all() and values.std() > 0
    size = tiny_model.metadata.image_size
    assert max(answer.input_width, answer.input_height) == size == answer.image_size
    assert (answer.width, answer.height) == (160, 120) and answer.weights_sha256 == tiny_model.metadata.weights_sha256


def test_http_calls_count_in_the_rpc_metrics_and_their_own(http_gateway, http):
    before = scrape(http_gateway.metrics_url)
    assert http.get("/v1/model").status_code == 200
    after = scrape(http_gateway.metrics_url)
    for name, labels in (("samserve_rpc_requests_total", {"method": "GetModel", "code": "OK"}),
                         ("samserve_http_requests_total", {"method": "GetModel", "status": "200"})):
        assert sample(after, name, **labels) == (sample(before, name, **labels) if (name, tuple(sorted(
            labels.items()))) in before else 0) + 1


def test_auth_and_permissions_are_the_grpc_ones(gateway_factory, tiny_triton, tmp_path):
    path = tmp_path / "keys.json"
    tokens = {}
    for tenant, methods in (("full", ["*"]), ("embed-only", ["Embed"])):
        done = subprocess.run([SAMSERVE, "keys", "add", "--tenant", tenant, "--file", str(path),
                               "--methods", ",".join(methods)],
                              capture_output=True, text=True, timeout=60, check=True)
        tokens[tenant] = done.stdout.strip()
    gateway = gateway_factory(tiny_triton.url, None, auth="api-keys", api_keys_file=path)
    with httpx.Client(base_url=gateway.http_url, timeout=60) as client:
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers={"authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/model", headers={"authorization": f"Bearer {tokens['full']}"}).status_code == 200
        refused = client.get("/v1/model", headers={"authorization": f"Bearer {tokens['embed-only']}"})
        assert refused.status_code == 403 and refused.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
