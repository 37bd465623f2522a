"""The generated protobuf/gRPC stubs of ``protos/samserve/v1/samserve.proto``.

The stubs are generated at build time by ``setup.py`` (``generate_stubs``, grpcio-tools): a wheel ships them as
``samserve/v1/``; an editable checkout gets them in ``service/samserve/v1/`` from ``make stubs`` (run by
``make setup``). They are never committed, and nothing here generates them.
"""

from __future__ import annotations

SERVICE_NAME = "samserve.v1.SegmentAnything"

try:
    from samserve.v1 import samserve_pb2 as pb
    from samserve.v1 import samserve_pb2_grpc as pb_grpc
except ModuleNotFoundError as error:
    if error.name not in ("samserve.v1", "samserve.v1.samserve_pb2", "samserve.v1.samserve_pb2_grpc"):
        raise
    raise ImportError(
        "the gRPC stubs samserve.v1 (samserve_pb2, samserve_pb2_grpc) are missing: they are generated from "
        "protos/samserve/v1/samserve.proto at build time; in a checkout run `make stubs` "
        "(or `python setup.py stubs` with grpcio-tools installed), or install the samserve wheel",
        name=error.name,
    ) from error

SERVICE = pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[1]]
"""The service's descriptor: its methods, their types and HTTP routes (:mod:`samserve.transport.http.app`)."""
METHOD_NAMES: tuple[str, ...] = tuple(method.name for method in SERVICE.methods)
"""Every RPC of the service, in the proto's order."""
UNARY_METHOD_NAMES: tuple[str, ...] = tuple(
    method.name for method in SERVICE.methods if not (method.client_streaming or method.server_streaming))
"""The RPCs with one request and one answer (each has an HTTP route); the others are streams (Interact)."""

__all__ = ["pb", "pb_grpc", "SERVICE", "SERVICE_NAME", "METHOD_NAMES", "UNARY_METHOD_NAMES"]
