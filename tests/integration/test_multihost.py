"""Several hosts for real: two "pods" (each a network namespace running Triton and a gateway with the
shared-memory transport, as the chart's sidecar pod does) and a Redis host, joined by veth pairs on a bridge, with
DELAY_S added each way on every connection between hosts (a user-space relay: this kernel has no netem, see
tests/support/delay_relay.py). The test process is the client host, on the bridge. Root only.

Shows: an image embedded through pod A is answered by pod B with no encoder run (Triton's statistics on B); what a
tier-2 (Redis) fetch costs over the delayed link; a pod lost under load (its processes killed; or its host gone
silent, a third pod), the client's retry policy (gRPC service config: UNAVAILABLE only, idempotent RPCs, round
robin over two pods) and keepalive carry on through pod B with no failed call."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from samserve.client import PromptSpec, SamServeClient
from tests.support.images import new_image
from tests.support.netns import NamespacesUnavailable, Network, check_namespaces
from tests.support.polling import wait_until
from tests.support.served_models import ExportedModel
from tests.support.triton_stats import decoder_count, encoder_count

DELAY_S = 0.001
"""Added each way between two hosts: a round trip between hosts costs at least 2 ms more than on one host."""
FETCH_SAMPLES = 9
CALLS_BEFORE_KILL = 30
CALLS_AFTER_KILL = 60
LOAD_THREADS = 3
LOAD_BOUND_S = 120.0
"""Upper bound of the load loop, whatever happens (each call also has its own deadline)."""
PROMPT = [PromptSpec(points=[(40, 30)], labels=[1])]


@pytest.fixture(scope="module")
def network(tiny_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    try:
        check_namespaces()
    except NamespacesUnavailable as reason:
        pytest.skip(f"multi-host test: {reason}")
    with Network(tmp_path_factory.mktemp("multihost"), DELAY_S) as made:
        redis_host = made.start_host("redis", "redis")
        for pod in ("a", "b", "c"):
            made.start_host(pod, "pod", model_dir=str(tiny_model.directory), redis_url=redis_host.redis_url)
        yield made


def _round_trip_s(client: redis.Redis) -> float:
    started = time.perf_counter()
    client.ping()
    return time.perf_counter() - started


def test_the_delay_is_on_the_path_between_hosts(network: Network) -> None:
    client = redis.Redis.from_url(network.hosts["redis"].redis_url)
    try:
        client.ping()  # the connection is made outside the timed round trips
        round_trips = sorted(_round_trip_s(client) for _ in range(20))
    finally:
        client.close()
    assert round_trips[0] >= 2 * DELAY_S, round_trips  # both directions held back, every time


def test_an_image_embedded_through_pod_a_is_answered_by_pod_b_without_an_encoder_run(network: Network) -> None:
    pod_a, pod_b = network.hosts["a"], network.hosts["b"]
    with SamServeClient(pod_a.gateway_target, timeout_s=60) as client_a, \
            SamServeClient(pod_b.gateway_target, timeout_s=60) as client_b:
        embedded = client_a.embed(new_image())
        assert not embedded.cached
        encodes_b = encoder_count(pod_b.triton_url)
        decodes_b = decoder_count(pod_b.triton_url)
        masks = client_b.segment(embedded.image_id, PROMPT)
        assert len(masks) == 1 and masks[0].masks.shape[1:] == (embedded.height, embedded.width)
        assert encoder_count(pod_b.triton_url) == encodes_b  # B took A's embedding from Redis
        assert decoder_count(pod_b.triton_url) == decodes_b + 1  # and decoded it itself

        # What the link costs: B's first Segment of an image embedded through A fetches the embedding from Redis
        # (tier 2, over the delayed link); its second finds it in its own process (tier 1).
        first, second = [], []
        for _ in range(FETCH_SAMPLES):
            image_id = client_a.embed(new_image()).image_id
            for timings in (first, second):
                started = time.perf_counter()
                client_b.segment(image_id, PROMPT)
                timings.append(time.perf_counter() - started)
        assert encoder_count(pod_b.triton_url) == encodes_b
    fetch_ms = (statistics.median(first) - statistics.median(second)) * 1e3
    print(f"\ntier-2 fetch over links delayed {DELAY_S * 1e3:.0f} ms each way: +{fetch_ms:.1f} ms on a Segment "
          f"(median of {FETCH_SAMPLES}: first {statistics.median(first) * 1e3:.1f} ms from Redis, "
          f"second {statistics.median(second) * 1e3:.1f} ms from tier 1)")


@pytest.mark.parametrize(("victim", "unplug"), [("a", False), ("c", True)], ids=["process-killed", "host-lost"])
def test_a_pod_lost_under_load_costs_no_call(network: Network, victim: str, unplug: bool) -> None:
    """``process-killed``: pod A's processes die, its address refuses connections (calls in flight end at once).
    ``host-lost``: pod C dies and its address goes silent (no reset reaches the client): the client's keepalive
    (samserve.service_config) notices within 10 + 5 s. Either way every call is answered, through pod B."""
    pods = [network.hosts[victim], network.hosts["b"]]
    answered: list[float] = []
    failures: list[grpc.StatusCode] = []
    stop = threading.Event()
    with SamServeClient(",".join(pod.gateway_target for pod in pods), timeout_s=60) as client:
        image_id = client.embed(new_image()).image_id
        decodes = [decoder_count(pod.triton_url) for pod in pods]

        def load() -> None:
            deadline = time.monotonic() + LOAD_BOUND_S
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    client.segment(image_id, PROMPT)
                    answered.append(time.monotonic())
                except grpc.RpcError as error:
                    failures.append(error.code())

        workers = [threading.Thread(target=load) for _ in range(LOAD_THREADS)]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: len(answered), lambda n: n >= CALLS_BEFORE_KILL, "calls answered before the kill")
            # Round robin spread them over both pods.
            assert all(decoder_count(pod.triton_url) > before for pod, before in zip(pods, decodes, strict=True))
            killed_at = time.monotonic()
            network.kill(victim, unplug=unplug)
            wait_until(lambda: sum(t > killed_at for t in answered), lambda n: n >= CALLS_AFTER_KILL,
                       "calls answered after the kill", timeout_s=LOAD_BOUND_S)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=LOAD_BOUND_S)
    assert not failures, failures
    assert not any(worker.is_alive() for worker in workers)
    times = sorted(answered)
    stalled_s = max(later - earlier for earlier, later in zip(times, times[1:], strict=False))
    print(f"\n{victim} lost ({'host' if unplug else 'processes'}): {len(answered)} calls, 0 failed, longest gap "
          f"between answers {stalled_s:.2f} s")
