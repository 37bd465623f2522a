"""The client's gRPC service config: UNAVAILABLE retried with bounded attempts and backoff for the idempotent RPCs,
round robin over several gateway addresses; and gRPC accepting it on a real channel. Connection age on the gateway
and channel age on its Triton client, so that replicas added by a scale-up get calls."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from concurrent import futures

import grpc
import pytest

from samserve.core import service_config
from samserve.core.api import SERVICE_NAME, pb
from samserve.core.settings import ClientSettings, GatewaySettings
from samserve.security.tls import client_channel
from samserve_dev.polling import wait_until, wait_until_async


def test_every_unary_rpc_of_the_service_retries_unavailable_with_bounded_exponential_backoff():
    config = json.loads(service_config.service_config())
    (method,) = config["methodConfig"]
    rpcs = {entry["method"] for entry in method["name"] if entry["service"] == SERVICE_NAME}
    methods = pb.DESCRIPTOR.services_by_name["SegmentAnything"].methods
    assert rpcs == {m.name for m in methods if not m.client_streaming} and "Segment" in rpcs
    assert "Interact" not in rpcs  # a session is not replayed: its client opens a new one
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == service_config.DEFAULT_ATTEMPTS == ClientSettings().retry_attempts == 5
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["backoffMultiplier"] > 1
    assert float(policy["initialBackoff"].rstrip("s")) < float(policy["maxBackoff"].rstrip("s"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]


def test_clients_ping_no_faster_than_the_gateway_accepts():
    client = dict(service_config.client_keepalive_options())
    server = dict(service_config.server_keepalive_options())
    assert ClientSettings().keepalive_s == service_config.KEEPALIVE_S
    assert ClientSettings.model_fields["keepalive_s"].metadata[0].ge == service_config.MIN_KEEPALIVE_S
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0  # a long silent call keeps being checked
    with pytest.raises(ValueError):
        service_config.client_keepalive_options(service_config.MIN_KEEPALIVE_S / 2)


def test_one_attempt_means_no_retry_policy():
    (method,) = json.loads(service_config.service_config(1))["methodConfig"]
    assert "retryPolicy" not in method
    with pytest.raises(ValueError):
        service_config.service_config(0)


def test_the_attempts_knob_is_read_from_the_environment_and_bounded(monkeypatch):
    monkeypatch.setenv("SAMSERVE_CLIENT_RETRY_ATTEMPTS", "3")
    assert ClientSettings().retry_attempts == 3
    monkeypatch.setenv("SAMSERVE_CLIENT_RETRY_ATTEMPTS", "9")
    with pytest.raises(ValueError):
        ClientSettings()


@pytest.mark.parametrize(("target", "resolved"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("gateway:50051", "gateway:50051"),
    ("dns:///gateways:50051", "dns:///gateways:50051"),
    ("127.0.0.1:1, 127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
])
def test_several_addresses_become_one_round_robin_target(target, resolved):
    assert service_config.channel_target(target) == resolved


@pytest.mark.parametrize("target", ["a:1,b:2", "127.0.0.1:1,[::1]:2", "127.0.0.1,127.0.0.2:1"])
def test_lists_of_names_or_mixed_families_are_refused(target):
    with pytest.raises(ValueError):
        service_config.channel_target(target)


def test_grpc_accepts_the_config_on_a_real_channel():
    """gRPC validates the config when it builds the channel: an invalid one fails every call with INVALID_ARGUMENT
    ("errors validating service config"); this one must fail a call to nothing for the usual reason, no connection."""
    with client_channel("127.0.0.1:1,127.0.0.1:2", retry_attempts=2) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/Embed", request_serializer=pb.EmbedRequest.SerializeToString,
                                   response_deserializer=pb.EmbedResponse.FromString)
        with pytest.raises(grpc.RpcError) as failure:
            call(pb.EmbedRequest(image=b"x"), timeout=5)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in (failure.value.details() or "").lower()


def test_every_client_call_names_its_image_for_consistent_hashing():
    from samserve.client.typed_client import IMAGE_ID_HEADER, routing_metadata
    from samserve.vision import images

    assert routing_metadata("abc123") == ((IMAGE_ID_HEADER, "abc123"),)
    assert routing_metadata(b"\x89PNG...") == ((IMAGE_ID_HEADER, images.image_id(b"\x89PNG...")),)


# -- connection age: gateways added by a scale-up get calls -------------------------------------------------------

def test_the_gateway_ages_connections_out_by_default_and_not_when_told_zero():
    settings = GatewaySettings()
    options = dict(service_config.server_connection_age_options(settings.max_connection_age_s,
                                                                 settings.max_connection_age_grace_s))
    assert options == {"grpc.max_connection_age_ms": 300_000, "grpc.max_connection_age_grace_ms": 30_000}
    assert dict(service_config.server_connection_age_options(2.5, 0.25)) == {
        "grpc.max_connection_age_ms": 2500, "grpc.max_connection_age_grace_ms": 250}
    assert service_config.server_connection_age_options(0, 30) == []


@pytest.mark.parametrize(("age_s", "grace_s", "named"), [
    (-1.0, 30.0, "max_connection_age_s"), (math.inf, 30.0, "max_connection_age_s"),
    (math.nan, 30.0, "max_connection_age_s"), (3e6, 30.0, "max_connection_age_s"),
    (300.0, -0.5, "max_connection_age_grace_s"), (300.0, math.inf, "max_connection_age_grace_s"),
])
def test_ages_gRPC_cannot_take_are_refused_naming_the_setting(age_s, grace_s, named):
    with pytest.raises(ValueError, match=named):
        service_config.server_connection_age_options(age_s, grace_s)


class _Peers:
    """A SegmentAnything/Embed that answers after ``work_s`` (so that calls are in flight when GOAWAY comes) and
    records the client connection (its peer address) of every call."""

    def __init__(self, work_s: float) -> None:
        self.work_s = work_s
        self.peers: list[str] = []
        self.lock = threading.Lock()

    def embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        time.sleep(self.work_s)  # the call's work
        with self.lock:
            self.peers.append(context.peer())
        return pb.EmbedResponse(image_id=request.image.decode())

    def distinct(self) -> int:
        with self.lock:
            return len(set(self.peers))


def test_the_clients_ride_over_the_gateways_goaway_without_a_failed_call():
    """With a short age, the gateway's server keeps closing client connections (GOAWAY, calls in flight finish in
    the grace); the project's client channel reconnects and no call fails."""
    peers = _Peers(work_s=0.05)
    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=service_config.server_connection_age_options(0.2, 1.0))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Embed": grpc.unary_unary_rpc_method_handler(peers.embed, pb.EmbedRequest.FromString,
                                                     pb.EmbedResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    answered = 0
    try:
        with client_channel(f"127.0.0.1:{port}") as channel:
            embed = channel.unary_unary(f"/{SERVICE_NAME}/Embed", request_serializer=pb.EmbedRequest.SerializeToString,
                                        response_deserializer=pb.EmbedResponse.FromString)

            def call() -> int:
                nonlocal answered
                assert embed(pb.EmbedRequest(image=b"x"), timeout=10).image_id == "x"  # any failure raises here
                answered += 1
                return peers.distinct()

            wait_until(call, lambda connections: connections >= 4, "client connections the server saw", 30, 0)
    finally:
        server.stop(None)
    assert answered == len(peers.peers)


def test_round_robin_options_spread_calls_over_every_address():
    """Without them a channel (gRPC's default, pick_first) sends every call to one address."""
    seen: list[int] = []
    servers, ports = [], []
    for index in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
            "Call": grpc.unary_unary_rpc_method_handler(lambda request, context, index=index: seen.append(index)
                                                        or b"")}),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    try:
        for options, expected in ((service_config.round_robin_options(), {0, 1}), ([], None)):
            seen.clear()
            with grpc.insecure_channel(target, options=options) as channel:
                for _ in range(10):
                    channel.unary_unary("/t.T/Call")(b"", timeout=10)
            assert len(seen) == 10
            assert set(seen) == expected if expected else len(set(seen)) == 1
    finally:
        for server in servers:
            server.stop(None)


class _Gate:
    """An in-process gRPC server whose calls with request ``b"slow"`` wait until :meth:`release`."""

    def __init__(self) -> None:
        self.entered = 0
        self.released = asyncio.Event()

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"slow":
            self.entered += 1
            await self.released.wait()
        return b"ok:" + request

    async def start(self) -> tuple[grpc.aio.Server, str]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
            "Call": grpc.unary_unary_rpc_method_handler(self.call)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"


def _call(channel: grpc.aio.Channel, request: bytes) -> grpc.aio.UnaryUnaryCall:
    return channel.unary_unary("/t.T/Call")(request, timeout=30)


def test_an_aging_channel_is_renewed_once_old_and_the_old_one_drains_its_calls_first():
    async def scenario() -> None:
        gate = _Gate()
        server, target = await gate.start()
        now = [0.0]
        aging = service_config.AgingChannel(lambda: grpc.aio.insecure_channel(target), max_age_s=10, drain_s=60,
                                            clock=lambda: now[0])
        try:
            first = aging.get()
            slow = asyncio.ensure_future(_call(first, b"slow"))
            await wait_until_async(lambda: gate.entered, lambda n: n == 1, "slow call on the server")
            now[0] = 9.9
            assert aging.get() is first and aging.renewals == 0
            now[0] = 10.0
            second = aging.get()
            assert second is not first and aging.renewals == 1
            assert await _call(second, b"new") == b"ok:new"
            assert aging.draining == 1 and not slow.done()  # the old channel waits for its call
            gate.released.set()
            assert await slow == b"ok:slow"  # and the call finishes
            await wait_until_async(lambda: aging.draining, lambda n: n == 0, "old channel closed")
            assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN
            now[0] = 19.9
            assert aging.get() is second  # its age counts from its renewal
        finally:
            await aging.close()
            await server.stop(None)
        assert second.get_state() is grpc.ChannelConnectivity.SHUTDOWN

    asyncio.run(scenario())


def test_closing_an_aging_channel_does_not_wait_for_old_ones_draining_and_zero_age_never_renews():
    async def scenario() -> None:
        gate = _Gate()
        server, target = await gate.start()
        now = [0.0]
        try:
            never = service_config.AgingChannel(lambda: grpc.aio.insecure_channel(target), 0, 60, clock=lambda: now[0])
            kept = never.get()
            now[0] = 1e9
            assert never.get() is kept and never.renewals == 0
            await never.close()
            assert kept.get_state() is grpc.ChannelConnectivity.SHUTDOWN

            aging = service_config.AgingChannel(lambda: grpc.aio.insecure_channel(target), 1, 60, clock=lambda: now[0])
            old = aging.get()
            slow = asyncio.ensure_future(_call(old, b"slow"))
            await wait_until_async(lambda: gate.entered, lambda n: n == 1, "slow call on the server")
            now[0] += 1
            current = aging.get()
            await asyncio.wait_for(aging.close(), 10)  # does not wait for the old channel's 60 s drain
            assert current.get_state() is grpc.ChannelConnectivity.SHUTDOWN
            assert aging.draining == 1 and not slow.done()
            gate.released.set()
            assert await slow == b"ok:slow"  # the old channel's call still finishes, then that channel closes
            await wait_until_async(lambda: aging.draining, lambda n: n == 0, "old channel closed")
            assert old.get_state() is grpc.ChannelConnectivity.SHUTDOWN
        finally:
            await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.parametrize(("max_age_s", "drain_s"), [(-1, 1), (math.inf, 1), (math.nan, 1), (1, -1), (1, math.nan)])
def test_an_aging_channel_refuses_ages_that_are_not_seconds(max_age_s, drain_s):
    with pytest.raises(ValueError):
        service_config.AgingChannel(lambda: grpc.aio.insecure_channel("127.0.0.1:1"), max_age_s, drain_s)
