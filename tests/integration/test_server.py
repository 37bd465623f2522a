"""The gateway built in process (``create_server`` with injected Triton client, port 0), against the real test
Triton over real gRPC channels: the interceptors' request ids, rich error details and metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from samserve import metrics
from samserve.api import pb, pb_grpc
from samserve.interceptors import REQUEST_ID_HEADER, STATUS_DETAILS_HEADER
from samserve.server import create_server
from samserve.settings import GatewaySettings
from samserve.triton_models import TritonSam
from tests.support.images import png_bytes, synthetic_image


def png(height: int, width: int, seed: int) -> bytes:
    return png_bytes(synthetic_image(height, width, seed=seed))


async def serving(gateway, channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
    """Bounded wait until the in-process gateway reports SERVING (its watcher read Triton's models)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    status = None
    while loop.time() < deadline:
        status = (await stub.Check(health_pb2.HealthCheckRequest())).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"in-process gateway not SERVING after {timeout_s} s (last status {status})")


def sample(name: str, **labels: str) -> float:
    value = metrics.RPC_REQUESTS.collect()[0]
    for found in value.samples:
        if found.name == name and found.labels == labels:
            return found.value
    return 0.0


@pytest.fixture
def in_process(tiny_triton, event_loop_runner):
    """(runner, gateway, channel): the whole gateway in this process on a free port, tier 1 only."""
    settings = GatewaySettings(gateway_port=0, embedding_transport="grpc", health_check_interval_s=0.05)

    async def start():
        gateway = await create_server(settings, TritonSam(tiny_triton.url, settings.embedding_transport), None)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        await serving(gateway, channel)
        return gateway, channel

    gateway, channel = event_loop_runner.run(start())
    yield event_loop_runner, gateway, channel
    event_loop_runner.run(channel.close())
    event_loop_runner.run(gateway.stop(1.0))


def test_in_process_gateway_answers_and_returns_the_request_id(in_process):
    runner, gateway, channel = in_process
    stub = pb_grpc.SegmentAnythingStub(channel)
    image = png(60, 80, seed=21)

    async def scenario():
        call = stub.Embed(pb.EmbedRequest(image=image), metadata=((REQUEST_ID_HEADER, "client-chosen-42"),))
        embedded = await call
        returned = dict(await call.trailing_metadata())[REQUEST_ID_HEADER]
        prompt = pb.Prompt(points=[pb.Point(x=40, y=30, label=pb.POINT_LABEL_FOREGROUND)], multimask_output=True)
        segment = stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=[prompt]))
        answer = await segment
        generated = dict(await segment.trailing_metadata())[REQUEST_ID_HEADER]
        return embedded, returned, answer, generated

    embedded, returned, answer, generated = runner.run(scenario())
    assert (embedded.width, embedded.height) == (80, 60) and not embedded.cached
    assert returned == "client-chosen-42"
    assert len(generated) == 16 and generated != returned  # none given: the gateway made one
    assert answer.cached and len(answer.results[0].masks) == 3
    assert answer.results[0].masks[0].rle.size == [60, 80]


def test_a_bad_field_comes_back_as_a_bad_request_violation_with_the_request_id(in_process):
    runner, gateway, channel = in_process
    stub = pb_grpc.SegmentAnythingStub(channel)
    before = sample("samserve_rpc_requests_total", method="Segment", code="INVALID_ARGUMENT")

    async def scenario():
        prompts = [pb.Prompt(points=[pb.Point(x=1, y=1, label=pb.POINT_LABEL_FOREGROUND)]),
                   pb.Prompt(points=[pb.Point(x=1, y=1, label=pb.POINT_LABEL_FOREGROUND),
                                     pb.Point(x=500, y=1, label=pb.POINT_LABEL_FOREGROUND)])]
        call = stub.Segment(pb.SegmentRequest(image_bytes=png(50, 70, seed=22), prompts=prompts),
                            metadata=((REQUEST_ID_HEADER, "bad-point-7"),))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return caught.value

    error = runner.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts[1].points[1]" in error.details() and "outside the 70x50 image" in error.details()
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_HEADER])
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.message == error.details()
    violations, info = error_details_pb2.BadRequest(), error_details_pb2.RequestInfo()
    assert status.details[0].Unpack(violations) and status.details[1].Unpack(info)
    assert [v.field for v in violations.field_violations] == ["prompts[1].points[1]"]
    assert info.request_id == trailers[REQUEST_ID_HEADER] == "bad-point-7"
    after = sample("samserve_rpc_requests_total", method="Segment", code="INVALID_ARGUMENT")
    assert after == before + 1  # the metrics interceptor saw the final code


def test_unknown_image_id_is_not_found_without_a_field(in_process):
    runner, gateway, channel = in_process
    stub = pb_grpc.SegmentAnythingStub(channel)

    async def scenario():
        prompt = pb.Prompt(points=[pb.Point(x=1, y=1, label=pb.POINT_LABEL_FOREGROUND)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Segment(pb.SegmentRequest(image_id="0" * 64, prompts=[prompt]))
        return caught.value

    error = runner.run(scenario())
    assert error.code() == grpc.StatusCode.NOT_FOUND and "send the image bytes again" in error.details()
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())[STATUS_DETAILS_HEADER])
    assert [detail.TypeName() for detail in status.details] == ["google.rpc.RequestInfo"]
