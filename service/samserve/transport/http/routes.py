"""The HTTP bindings of the API: every RPC of ``samserve.v1.SegmentAnything`` at the route its ``google.api.http``
option (or one of its ``additional_bindings``) names, read from the descriptors the build generated."""

from __future__ import annotations

import dataclasses

from google.api import annotations_pb2
from google.protobuf import descriptor, message

from samserve.core.api import SERVICE


@dataclasses.dataclass(frozen=True)
class HttpRoute:
    """One HTTP binding of an RPC (a ``google.api.HttpRule`` or one of its ``additional_bindings``)."""

    method: descriptor.MethodDescriptor
    verb: str
    """GET or POST."""
    template: str
    """The path, with ``{field}`` for path parameters."""
    body: str
    """``*``: the request body is the request message; empty: no body (query parameters)."""

    @property
    def request_type(self) -> type[message.Message]:
        return _message_class(self.method.input_type)

    @property
    def response_type(self) -> type[message.Message]:
        return _message_class(self.method.output_type)

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(part.split("}")[0] for part in self.template.split("{")[1:])

    @property
    def image_field(self) -> descriptor.FieldDescriptor | None:
        """The request's top-level ``bytes`` field: where a raw or multipart image goes."""
        fields = [f for f in self.method.input_type.fields if f.type == descriptor.FieldDescriptor.TYPE_BYTES]
        return fields[0] if len(fields) == 1 else None


def _message_class(message_descriptor: descriptor.Descriptor) -> type[message.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(message_descriptor)


def http_routes(service: descriptor.ServiceDescriptor = SERVICE) -> list[HttpRoute]:
    """Every HTTP binding of ``service``'s methods, from their ``google.api.http`` options, in proto order."""
    routes = []
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in (rule, *rule.additional_bindings):
            verb = binding.WhichOneof("pattern")
            if verb is None:
                continue
            routes.append(HttpRoute(method, verb.upper(), getattr(binding, verb), binding.body))
    return routes
