"""The OpenAPI 3.1 document of the HTTP/JSON API, generated from the proto's descriptors (never written by hand).

Paths and verbs come from the ``google.api.http`` options (:func:`samserve.transport.http.routes.http_routes`); schemas
from
the messages, in protobuf's JSON mapping (lowerCamelCase names, 64-bit integers as strings, bytes as base64,
enums by name); descriptions from the proto's comments (the descriptor set the build writes beside the stubs);
errors are ``google.rpc.Status``. Served at ``/openapi.json``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

from samserve import __version__
from samserve.transport.http.routes import HttpRoute

F = descriptor.FieldDescriptor
NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
"""How protobuf's JSON mapping writes a float that is not finite (a stability score of an empty mask is NaN)."""
SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"oneOf": [{"type": "number", "format": "double"}, NON_FINITE]},
    F.TYPE_FLOAT: {"oneOf": [{"type": "number", "format": "float"}, NON_FINITE]},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
"""Field type -> JSON schema of its value in protobuf's JSON mapping."""

STATUS_SCHEMA = "google.rpc.Status"
HTTP_BODY = "google.api.HttpBody"
BINARY = {"type": "string", "format": "binary"}


DESCRIPTOR_SET = "samserve.binpb"
"""Written by the build next to the stubs (``setup.py``: ``protoc --include_source_info``)."""
MESSAGE, ENUM, SERVICE, FIELD, VALUE, METHOD, NESTED_MESSAGE, NESTED_ENUM = 4, 5, 6, 2, 2, 2, 3, 4
"""Field numbers of FileDescriptorProto / DescriptorProto / ... that make up a ``SourceCodeInfo`` path."""


def proto_comments() -> dict[str, str]:
    """Full name of every message, field, enum, enum value, service and method -> its comment in the proto (the
    leading one, else the trailing one); empty when the descriptor set is not there."""
    resource = importlib.resources.files("samserve.v1") / DESCRIPTOR_SET
    if not resource.is_file():
        return {}
    names: dict[tuple[int, ...], str] = {}

    def messages(path: tuple[int, ...], prefix: str, types: Any) -> None:
        for i, message_type in enumerate(types):
            name, here = f"{prefix}.{message_type.name}", (*path, i)
            names[here] = name
            for j, field in enumerate(message_type.field):
                names[(*here, FIELD, j)] = f"{name}.{field.name}"
            messages((*here, NESTED_MESSAGE), name, message_type.nested_type)
            enums((*here, NESTED_ENUM), name, message_type.enum_type)

    def enums(path: tuple[int, ...], prefix: str, types: Any) -> None:
        for i, enum_type in enumerate(types):
            names[(*path, i)] = f"{prefix}.{enum_type.name}"
            for j, value in enumerate(enum_type.value):
                names[(*path, i, VALUE, j)] = f"{prefix}.{value.name}"

    comments = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(resource.read_bytes()).file:
        names.clear()
        messages((MESSAGE,), file.package, file.message_type)
        enums((ENUM,), file.package, file.enum_type)
        for i, service in enumerate(file.service):
            names[(SERVICE, i)] = f"{file.package}.{service.name}"
            for j, method in enumerate(service.method):
                names[(SERVICE, i, METHOD, j)] = f"{file.package}.{service.name}.{method.name}"
        for location in file.source_code_info.location:
            text = (location.leading_comments or location.trailing_comments).strip()
            name = names.get(tuple(location.path))
            if name and text:
                comments[name] = " ".join(line.strip() for line in text.splitlines())
    return comments


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    """The ``components.schemas`` of every message reachable from the routes."""

    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {STATUS_SCHEMA: {
            "type": "object", "description": "The error: gRPC status code, message and google.rpc details.",
            "properties": {"code": {"type": "integer", "format": "int32"}, "message": {"type": "string"},
                           "details": {"type": "array", "items": {
                               "type": "object", "properties": {"@type": {"type": "string"}},
                               "additionalProperties": True}}},
        }}

    def message(self, message_type: descriptor.Descriptor) -> dict[str, str]:
        name = message_type.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # placed first: recursive messages refer to it
            properties = {field.json_name: self.field(field) | self.described(field.full_name)
                          for field in message_type.fields}
            self.schemas[name] = {"type": "object", "properties": properties, "additionalProperties": False,
                                  **self.described(name)}
        return _ref(name)

    def described(self, full_name: str) -> dict[str, str]:
        text = self.comments.get(full_name)
        return {"description": text} if text else {}

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            value: dict[str, Any] = self.message(field.message_type)
        elif field.type == F.TYPE_ENUM:
            value = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        else:
            value = dict(SCALARS[field.type])
        if field.is_repeated:
            return {"type": "array", "items": value}
        return value


def _request_body(route: HttpRoute, schemas: _Schemas) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schemas.message(route.method.input_type)}}
    image = route.image_field
    if image is not None:
        content["image/*"] = {"schema": BINARY}
        content["application/octet-stream"] = {"schema": BINARY}
        content["multipart/form-data"] = {"schema": {
            "type": "object",
            "properties": {"image": BINARY, "request": schemas.message(route.method.input_type)},
            "description": f"part `image`: the image file (into `{image.json_name}`); part `request`: the other "
                           "fields as JSON",
        }}
    return {"required": False, "content": content}


def _parameters(route: HttpRoute, schemas: _Schemas) -> list[dict[str, Any]]:
    fields = {f.name: f for f in route.method.input_type.fields}
    parameters = [{"name": name, "in": "path", "required": True, "schema": schemas.field(fields[name])}
                  for name in route.path_fields]
    if not route.body:
        parameters += [
            {"name": field.json_name, "in": "query", "required": False, "schema": schemas.field(field)}
            for field in route.method.input_type.fields
            if field.name not in route.path_fields and field.type != F.TYPE_MESSAGE
        ]
    return parameters


def document(routes: Sequence[HttpRoute]) -> dict[str, Any]:
    """The OpenAPI document of ``routes``."""
    schemas = _Schemas(proto_comments())
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for route in routes:
        name = route.method.name
        seen[name] = seen.get(name, 0) + 1
        if route.method.output_type.full_name == HTTP_BODY:
            ok = {"description": "the file", "content": {"application/octet-stream": {"schema": BINARY}}}
        else:
            ok = {"description": route.method.output_type.name,
                  "content": {"application/json": {"schema": schemas.message(route.method.output_type)}}}
        operation: dict[str, Any] = {
            "operationId": name if seen[name] == 1 else f"{name}{seen[name]}",
            "summary": f"{route.method.containing_service.full_name}.{name}",
            **schemas.described(route.method.full_name),
            "parameters": _parameters(route, schemas),
            "responses": {"200": ok, "default": {
                "description": "an error: HTTP status from the gRPC code (Google's mapping)",
                "content": {"application/json": {"schema": _ref(STATUS_SCHEMA)}}}},
        }
        if route.body:
            operation["requestBody"] = _request_body(route, schemas)
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "samserve", "version": __version__,
                 "description": "Segment Anything as a service: the HTTP/JSON twin of samserve.v1.SegmentAnything."},
        "paths": paths,
        "components": {
            "schemas": schemas.schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "API key or JWT (when the gateway has auth on)"}},
        },
        "security": [{"bearer": []}, {}],
    }
