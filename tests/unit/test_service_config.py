"""The client's gRPC service config: UNAVAILABLE retried with bounded attempts and backoff for the idempotent RPCs,
round robin over several gateway addresses; and gRPC accepting it on a real channel."""

from __future__ import annotations

import json

import grpc
import pytest

from samserve import service_config
from samserve.api import SERVICE_NAME, pb
from samserve.settings import ClientSettings
from samserve.tls import client_channel


def test_every_rpc_of_the_service_retries_unavailable_with_bounded_exponential_backoff():
    config = json.loads(service_config.service_config())
    (method,) = config["methodConfig"]
    rpcs = {entry["method"] for entry in method["name"] if entry["service"] == SERVICE_NAME}
    assert rpcs == set(pb.DESCRIPTOR.services_by_name["SegmentAnything"].methods_by_name)
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
    from samserve import images
    from samserve.client import IMAGE_ID_HEADER, routing_metadata

    assert routing_metadata("abc123") == ((IMAGE_ID_HEADER, "abc123"),)
    assert routing_metadata(b"\x89PNG...") == ((IMAGE_ID_HEADER, images.image_id(b"\x89PNG...")),)
