"""The HTTP transport's pure parts: routes from the proto's options, Google's status mapping, the OpenAPI document,
and how an HTTP request becomes a request message (the whole transport against a real gateway:
tests/integration/test_http.py)."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import httpx
import pytest
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from samserve.core.api import UNARY_METHOD_NAMES
from samserve.transport.http import openapi
from samserve.transport.http.routes import HttpRoute, http_routes
from samserve.transport.http.transcoding import HTTP_STATUS, HttpError, build_request, error_response

ROUTES = http_routes()


def test_every_status_code_has_an_http_status():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429 and HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404


def test_every_rpc_has_a_route_and_images_go_to_the_one_bytes_field():
    assert {route.method.name for route in ROUTES} == set(UNARY_METHOD_NAMES)
    fields = {route.method.name: route.image_field.name if route.image_field else None for route in ROUTES}
    assert fields == {"Embed": "image", "Segment": "image_bytes", "GenerateMasks": "image_bytes",
                      "GetEmbedding": "image_bytes", "GetModel": None, "GetDecoder": None}
    templates = {(route.verb, route.template) for route in ROUTES}
    assert len(templates) == len(ROUTES), "two bindings share a verb and path"


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_openapi_document_is_complete_and_every_reference_resolves():
    document = json.loads(json.dumps(openapi.document(ROUTES)))
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for route in ROUTES:
        operation = document["paths"][route.template][route.verb.lower()]
        declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert declared == set(route.path_fields)
        assert ("requestBody" in operation) == bool(route.body)
    point = schemas["samserve.v1.Point"]["properties"]
    assert point["label"]["enum"][0] == "POINT_LABEL_UNSPECIFIED" and point["x"]["oneOf"][0]["type"] == "number"
    assert schemas["samserve.v1.Mask"]["properties"]["area"] == {"type": "string", "format": "uint64",
                                                            "description": "mask pixels"}
    assert "multipart/form-data" in document["paths"]["/v1/images:embed"]["post"]["requestBody"]["content"]
    # Descriptions are the proto's comments (the descriptor set the build writes beside the stubs).
    assert "decoded as one batch" in document["paths"]["/v1/images:segment"]["post"]["description"]
    assert "255 = mask" in schemas["samserve.v1.Mask"]["properties"]["png"]["description"]


def _route(method: str, verb: str, path_fields: tuple[str, ...] = ()) -> HttpRoute:
    return next(r for r in ROUTES if r.method.name == method and r.verb == verb and r.path_fields == path_fields)


class _Client:
    """Calls :func:`build_request` for one route as Starlette would (its path matching, a real ASGI request) and
    answers the message as JSON, or the transport's error response. httpx only encodes the requests."""

    def __init__(self, route: HttpRoute, limit: int = 1 << 20) -> None:
        self.route, self.limit = route, limit
        self.starlette_route = Route(route.template, lambda request: None, methods=[route.verb])

    def _call(self, verb: str, path: str, **options: object) -> Response:
        encoded = httpx.Request(verb, f"http://test{path}", **options)  # type: ignore[arg-type]
        body = encoded.read()
        scope = {"type": "http", "method": verb, "path": encoded.url.path, "root_path": "",
                 "query_string": encoded.url.query,
                 "headers": [(name.lower(), value) for name, value in encoded.headers.raw]}
        match, child = self.starlette_route.matches(scope)
        assert match is Match.FULL, f"{verb} {path} does not match {self.route.template}"
        scope.update(child)
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def run() -> Response:
            try:
                built = await build_request(self.route, Request(scope, receive), self.limit)
            except HttpError as error:
                return error_response(error.code, str(error), http_status=error.http_status)
            return JSONResponse(json_format.MessageToDict(built))

        return asyncio.run(run())

    def get(self, path: str, **options: object) -> Response:
        return self._call("GET", path, **options)

    def post(self, path: str, **options: object) -> Response:
        return self._call("POST", path, **options)


def _json(response: Response) -> dict:
    return json.loads(bytes(response.body))


def test_path_and_query_parameters_fill_the_message():
    client = _Client(_route("GetEmbedding", "GET", ("image_id",)))
    assert _json(client.get("/v1/images/abc/embedding")) == {"imageId": "abc"}
    refused = client.get("/v1/images/abc/embedding", params={"nope": "1"})
    assert refused.status_code == 400 and "unknown query parameter 'nope'" in _json(refused)["message"]
    generate = _Client(_route("GenerateMasks", "POST", ("image_id",)))
    answer = generate.post("/v1/images/xyz:generateMasks", params={"points_per_side": "8", "cropNLayers": "1",
                                                                   "maskEncoding": "MASK_ENCODING_PNG"})
    assert _json(answer) == {"imageId": "xyz", "pointsPerSide": 8, "cropNLayers": 1,
                             "maskEncoding": "MASK_ENCODING_PNG"}
    wrong = generate.post("/v1/images/xyz:generateMasks", params={"points_per_side": "many"})
    assert wrong.status_code == 400 and "points_per_side" in _json(wrong)["message"]


def test_an_image_comes_as_json_raw_bytes_or_multipart():
    client = _Client(_route("Segment", "POST"))
    image = b"\x89PNG fake bytes"
    raw = client.post("/v1/images:segment", content=image, headers={"content-type": "image/png"})
    as_json = client.post("/v1/images:segment", json={"imageBytes": base64.b64encode(image).decode()})
    multipart = client.post("/v1/images:segment", files={"image": ("a.png", image, "image/png")},
                            data={"request": json.dumps({"prompts": [{"multimaskOutput": True}]})})
    for response in (raw, as_json, multipart):
        assert response.status_code == 200, bytes(response.body)
        assert base64.b64decode(_json(response)["imageBytes"]) == image
    assert _json(multipart)["prompts"] == [{"multimaskOutput": True}]


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (b"{", {"content-type": "application/json"}, 400, "not a valid SegmentRequest"),
    (b'{"prompt": []}', {"content-type": "application/json"}, 400, "prompt"),
    (b"x", {"content-type": "text/plain"}, 415, "unsupported content type"),
    (b"x" * 2000, {"content-type": "image/png"}, 429, "over the limit"),
])
def test_unreadable_requests_get_a_status_body(body, headers, status, words):
    response = _Client(_route("Segment", "POST"), limit=1000).post("/v1/images:segment", content=body,
                                                                   headers=headers)
    assert response.status_code == status
    assert words in _json(response)["message"] and _json(response)["code"] in (3, 8)


def test_a_grpc_error_becomes_its_http_twin_with_retry_after():
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status(code=8, message="slow down")
    status.details.add().Pack(error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject="tenant:a/requests")]))
    response = error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (
        ("grpc-status-details-bin", status.SerializeToString()), ("retry-after", "2.250"), ("x-request-id", "r1")))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3" and response.headers["x-request-id"] == "r1"
    body = json.loads(bytes(response.body))
    assert body["message"] == "slow down" and body["details"][0]["violations"][0]["subject"] == "tenant:a/requests"


def test_a_request_without_fields_takes_no_query():
    client = _Client(_route("GetModel", "GET"))
    assert _json(client.get("/v1/model")) == {}
    assert client.get("/v1/model", params={"modelId": "x"}).status_code == 400
