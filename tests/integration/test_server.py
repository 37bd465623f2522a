"""The gateway built in process (``create_server`` with injected Triton client, port 0), against the real test
Triton over real gRPC channels: the interceptors' request ids, rich error details and metrics; and, with the test
holding the gateway's encode slot itself, that a call's deadline or cancellation drops the Triton work it still
waited for, and that a full encode queue refuses at once."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from samserve.cli import serve
from samserve.core import model_spec
from samserve.core.api import pb, pb_grpc
from samserve.core.settings import GatewaySettings, StackSettings
from samserve.launch import redis_server
from samserve.transport.call_context import REQUEST_ID_HEADER
from samserve.transport.grpc_server import Gateway, create_server
from samserve.transport.status import STATUS_DETAILS_HEADER
from samserve.triton.models import TritonSam
from samserve_dev.images import new_image, png_bytes, synthetic_image
from samserve_dev.metrics import local_samples
from samserve_dev.metrics import sample as strict_sample
from samserve_dev.polling import wait_until_async, wait_until_stable
from samserve_dev.triton_stats import decoder_count, encoder_count


def png(height: int, width: int, seed: int) -> bytes:
    return png_bytes(synthetic_image(height, width, seed=seed))


async def serving(channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
    """Bounded wait until the in-process gateway reports SERVING (its watcher read Triton's models)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)

    async def status() -> int:
        return (await stub.Check(health_pb2.HealthCheckRequest())).status

    await wait_until_async(status, lambda value: value == health_pb2.HealthCheckResponse.SERVING,
                           "in-process gateway SERVING", timeout_s, interval_s=0.05)


def requests_before(method: str, code: str) -> float:
    """``samserve_rpc_requests_total{method, code}`` of this process before a call: 0 while no such call was
    counted yet (a labelled series exists from its first increment)."""
    return local_samples().get(("samserve_rpc_requests_total", (("code", code), ("method", method))), 0.0)


def inflight(method: str) -> float:
    """The gateway's in-flight gauge for ``method`` (this process's registry); a missing series fails."""
    return strict_sample(local_samples(), "samserve_inflight_requests", method=method)


InProcess = tuple[asyncio.Runner, Gateway, grpc.aio.Channel]


@pytest.fixture
def in_process_factory(tiny_triton, event_loop_runner) -> Iterator[Callable[..., InProcess]]:
    """Build the whole gateway in this process on a free port, tier 1 only, with ``settings`` over the defaults:
    (runner, gateway, channel). Everything built is stopped at the test's end."""
    built: list[tuple[Gateway, grpc.aio.Channel]] = []

    def make(**settings: object) -> InProcess:
        chosen = GatewaySettings(**{"gateway_port": 0, "embedding_transport": "grpc", "health_check_interval_s": 0.05,
                                    "auth": "off", "http_port": None, **settings})

        async def start() -> tuple[Gateway, grpc.aio.Channel]:
            gateway = await create_server(chosen, TritonSam(tiny_triton.url, chosen.embedding_transport), None)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
            built.append((gateway, channel))
            await serving(channel)
            return gateway, channel

        gateway, channel = event_loop_runner.run(start())
        return event_loop_runner, gateway, channel

    yield make
    for gateway, channel in built:
        event_loop_runner.run(channel.close())
        event_loop_runner.run(gateway.stop(1.0))


@pytest.fixture
def in_process(in_process_factory) -> InProcess:
    """(runner, gateway, channel) with the default settings."""
    return in_process_factory()


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
    before = requests_before("Segment", "INVALID_ARGUMENT")

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
    after = strict_sample(local_samples(), "samserve_rpc_requests_total", method="Segment", code="INVALID_ARGUMENT")
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


# -- work that a call no longer waits for is dropped ----------------------------------------------------------------
# The test itself holds the gateway's only encode slot (its EncodeLimiter, max_concurrent_encodes=1), so a request
# is provably queued for the encoder while its deadline passes or its client cancels; Triton's own statistics then
# show which encoder and decoder calls ran.

DEADLINE_S = 1.0
"""Client deadline of a call that must expire while it waits (it is queued within milliseconds)."""


def test_an_embed_whose_deadline_passes_in_the_encode_queue_never_runs_the_encoder(in_process_factory, tiny_triton):
    runner, gateway, channel = in_process_factory(max_concurrent_encodes=1)
    stub = pb_grpc.SegmentAnythingStub(channel)
    limiter = gateway.watcher.limiter
    encodes = encoder_count(tiny_triton.url)

    async def scenario() -> tuple[grpc.aio.AioRpcError, pb.EmbedResponse]:
        async with limiter.slot():
            call = stub.Embed(pb.EmbedRequest(image=new_image()), timeout=DEADLINE_S)
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 1, "Embed queued for the encoder",
                                   timeout_s=DEADLINE_S)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            # The gateway dropped it while the slot was still taken: it left the queue and the call ended.
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 0, "expired Embed still queued")
            await wait_until_async(lambda: inflight("Embed"), lambda n: n == 0, "Embed in flight after its deadline")
        # The slot is free. The queue is FIFO and one encode runs at a time: an expired Embed still waiting would
        # encode before this one, and Triton would count both.
        return caught.value, await stub.Embed(pb.EmbedRequest(image=new_image()), timeout=60)

    error, later = runner.run(scenario())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not later.cached
    assert encoder_count(tiny_triton.url) == encodes + 1


def test_a_cancelled_segment_waiting_for_its_image_runs_no_decoder(in_process_factory, tiny_triton):
    """A Segment (by bytes, many prompts) waits for the single-flight encode of its image by an Embed queued
    behind the held slot; its client cancels. The Embed still encodes the image (once), the Segment decodes nothing.
    (A Segment sends all its decoder calls at once, one per prompt token count, right after its embedding is
    ready: before that is where a cancelled Segment can stop Triton work.)"""
    runner, gateway, channel = in_process_factory(max_concurrent_encodes=1)
    stub = pb_grpc.SegmentAnythingStub(channel)
    limiter = gateway.watcher.limiter
    data = new_image()
    prompts = [pb.Prompt(points=[pb.Point(x=1 + k, y=1 + j, label=pb.POINT_LABEL_FOREGROUND) for j in range(n)],
                         multimask_output=True) for k in range(16) for n in (1, 2)]
    encodes, decodes = encoder_count(tiny_triton.url), decoder_count(tiny_triton.url)

    def waits() -> float:
        return strict_sample(local_samples(), "samserve_single_flight_waits_total")

    async def scenario() -> tuple[pb.EmbedResponse, pb.SegmentResponse]:
        waits_before = waits()
        async with limiter.slot():
            embed = stub.Embed(pb.EmbedRequest(image=data), timeout=60)
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 1, "Embed queued for the encoder")
            segment = stub.Segment(pb.SegmentRequest(image_bytes=data, prompts=prompts), timeout=60)
            await wait_until_async(waits, lambda n: n == waits_before + 1, "Segment waiting for the Embed's encode")
            segment.cancel()
            with pytest.raises(asyncio.CancelledError):
                await segment
            await wait_until_async(lambda: inflight("Segment"), lambda n: n == 0, "Segment in flight after cancel")
            assert inflight("Embed") == 1 and limiter.waiting == 1  # the Embed is not the Segment's to drop
        embedded = await embed
        # A Segment still at work would decode as soon as the image is embedded, before this one's round trip.
        return embedded, await stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=prompts[:1]))

    embedded, later = runner.run(scenario())
    assert not embedded.cached and later.cached
    assert encoder_count(tiny_triton.url) == encodes + 1
    settled = wait_until_stable(lambda: decoder_count(tiny_triton.url), "decoder calls")
    assert settled == decodes + 1  # the later Segment's one call; the cancelled one's 2 token groups never ran


def test_a_full_encode_queue_is_resource_exhausted_at_once(in_process_factory):
    runner, gateway, channel = in_process_factory(max_concurrent_encodes=1, max_queued_encodes=1)
    stub = pb_grpc.SegmentAnythingStub(channel)
    limiter = gateway.watcher.limiter

    async def scenario() -> tuple[grpc.aio.AioRpcError, pb.EmbedResponse]:
        async with limiter.slot():
            queued = stub.Embed(pb.EmbedRequest(image=new_image()), timeout=60)
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 1, "first Embed queued")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(pb.EmbedRequest(image=new_image()), timeout=10)  # answered while the slot is held
        return caught.value, await queued

    error, first = runner.run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already queued" in error.details()
    assert not first.cached


def test_an_http_client_that_disconnects_while_queued_drops_its_encode(in_process_factory, tiny_triton):
    """The HTTP transport's twin of the deadline test: an Embed sent over HTTP waits behind the held slot, its
    client closes the connection; the gateway cancels the call (it leaves the queue) and never encodes the image."""
    runner, gateway, _ = in_process_factory(max_concurrent_encodes=1, http_port=0)
    assert gateway.http is not None
    limiter = gateway.watcher.limiter
    encodes = encoder_count(tiny_triton.url)
    image = new_image()

    async def scenario() -> None:
        async with limiter.slot():
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
            writer.write(b"POST /v1/images:embed HTTP/1.1\r\nhost: gateway\r\ncontent-type: image/png\r\n"
                         + f"content-length: {len(image)}\r\n\r\n".encode() + image)
            await writer.drain()
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 1, "HTTP Embed queued for the encoder")
            writer.close()
            await writer.wait_closed()
            await wait_until_async(lambda: limiter.waiting, lambda n: n == 0, "Embed queued after its client left")
            await wait_until_async(lambda: inflight("Embed"), lambda n: n == 0, "Embed in flight after disconnect")

    runner.run(scenario())
    assert wait_until_stable(lambda: encoder_count(tiny_triton.url), "encoder calls") == encodes


def test_up_binds_triton_and_redis_to_loopback_by_default(tmp_path, monkeypatch):
    """What `samserve up` passes to its launchers with default settings (fakes stand in for the processes)."""
    launched: dict[str, dict[str, object]] = {}

    class Stop(Exception):
        pass

    real_redis_host = inspect.signature(redis_server.RedisServer).parameters["host"].default

    class FakeRedis:
        def __init__(self, port: int, workdir: Path, **kwargs: object) -> None:
            launched["redis"] = {"host": kwargs.get("host", real_redis_host), "port": port}
            self.url = f"redis://127.0.0.1:{port}/0"

        def start(self) -> FakeRedis:
            return self

        def stop(self) -> None:
            pass

    class FakeTriton:
        def __init__(self, **kwargs: object) -> None:
            launched["triton"] = kwargs

        def start(self) -> None:
            raise Stop

        def stop(self) -> None:
            pass

    monkeypatch.setattr(serve, "RedisServer", FakeRedis)
    monkeypatch.setattr(serve, "redis_binary", lambda: "/usr/bin/redis-server")
    monkeypatch.setattr(serve, "TritonServer", FakeTriton)
    for name in ("SAMSERVE_TRITON_HOST", "SAMSERVE_REDIS_URL", "SAMSERVE_GATEWAY_HOST"):
        monkeypatch.delenv(name, raising=False)
    stack = StackSettings(workdir=tmp_path, auth="off")  # type: ignore[arg-type]
    (stack.repository / model_spec.ENCODER_MODEL).mkdir(parents=True)
    (stack.repository / model_spec.ENCODER_MODEL / "config.pbtxt").write_text("")
    with pytest.raises(Stop):
        serve.up(stack)
    assert launched["triton"]["host"] == "127.0.0.1"
    assert launched["redis"]["host"] == "127.0.0.1"
    assert stack.gateway_host == "127.0.0.1"
