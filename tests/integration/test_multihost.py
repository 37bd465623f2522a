"""Several hosts for real: two "pods" (each a network namespace running Triton and a gateway with the
shared-memory transport, as the chart's sidecar pod does) and a Redis host, joined by veth pairs on a bridge, with
DELAY_S added each way on every connection between hosts (a user-space relay: this kernel has no netem, see
tools/samserve_dev/delay_relay.py). The test process is the client host, on the bridge. Root only.

Shows: an image embedded through pod A is answered by pod B with no encoder run (Triton's statistics on B); what a
tier-2 (Redis) fetch costs over the delayed link; a pod lost under load (its processes killed; or its host gone
silent, a third pod), the client's retry policy (gRPC service config: UNAVAILABLE only, idempotent RPCs, round
robin over two pods) and keepalive carry on through pod B with no failed call.

Scale-up: a DNS host answers names as a cluster's DNS answers a headless Service. Clients connected to two pods
through such a name reach a third pod added to it within the gateways' connection age (GOAWAY makes them resolve the
name again), and a gateway whose Triton host is such a name spreads its calls over the Tritons and reaches a third
within its channel age, with no failed call. Every gateway here ages its connections out every
``CONNECTION_AGE_S``, so every test of the module also runs through many GOAWAYs. The scale-up tests come before
the pod-loss tests, which kill pods A and C."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import pb, pb_grpc
from samserve.security.tls import client_channel
from samserve_dev import netns_host
from samserve_dev.images import new_image
from samserve_dev.local_stack import GatewayProcess
from samserve_dev.netns import Host, NamespacesUnavailable, Network, check_namespaces
from samserve_dev.polling import wait_until
from samserve_dev.served_models import ExportedModel
from samserve_dev.triton_stats import decoder_count, encoder_count

DELAY_S = 0.001
"""Added each way between two hosts: a round trip between hosts costs at least 2 ms more than on one host."""
FETCH_SAMPLES = 9
CALLS_BEFORE_KILL = 30
CALLS_AFTER_KILL = 60
LOAD_THREADS = 3
LOAD_BOUND_S = 120.0
"""Upper bound of the load loop, whatever happens (each call also has its own deadline)."""
PROMPT = [PromptSpec(points=[(40, 30)], labels=[1])]
CONNECTION_AGE_S = 2.0
CONNECTION_AGE_GRACE_S = 1.0
"""Every pod's gateway sends GOAWAY on a client connection after about this long (SAMSERVE_MAX_CONNECTION_AGE_S,
gRPC adds up to 10 %), and closes it that much later (calls take milliseconds here)."""
DNS_COOLDOWN_MS = 500
"""The scale-up client's grpc.dns_min_time_between_resolutions_ms: gRPC resolves a name at most every 30 s per
channel by default, longer than this test's connection age (not than the default age, 300 s)."""
TRITON_CHANNEL_AGE_S = 2.0
"""SAMSERVE_TRITON_CHANNEL_MAX_AGE_S of the gateway whose Triton host is a DNS name."""
JOIN_MARGIN_S = 15.0
"""Added to the most a new address can take to get calls (a loaded, shared 2-core machine runs three Tritons)."""
GATEWAYS, TRITONS = "gateways.samserve.test", "tritons.samserve.test"


@pytest.fixture(scope="module")
def network(tiny_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    try:
        check_namespaces()
    except NamespacesUnavailable as reason:
        pytest.skip(f"multi-host test: {reason}")
    with Network(tmp_path_factory.mktemp("multihost"), DELAY_S) as made:
        redis_host = made.start_host("redis", "redis")
        ages = json.dumps({"max_connection_age_s": CONNECTION_AGE_S,
                           "max_connection_age_grace_s": CONNECTION_AGE_GRACE_S})
        for pod in ("a", "b", "c"):
            made.start_host(pod, "pod", model_dir=str(tiny_model.directory), redis_url=redis_host.redis_url,
                            gateway_settings=ages)
        made.start_dns()
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


class Load:
    """``threads`` threads calling ``call`` in a loop until :meth:`stop` (or ``LOAD_BOUND_S``): when each call was
    answered, and the status of each that failed."""

    def __init__(self, call: Callable[[], object], threads: int = LOAD_THREADS) -> None:
        self.call = call
        self.answered: list[float] = []
        self.failures: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_BOUND_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.call()
                self.answered.append(time.monotonic())
            except grpc.RpcError as error:
                self.failures.append(error.code())

    def answered_since(self, moment: float) -> int:
        return sum(t > moment for t in self.answered)

    def __enter__(self) -> Load:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=LOAD_BOUND_S)
        assert not any(worker.is_alive() for worker in self._workers)


def _alive(*hosts: Host) -> list[Host]:
    for host in hosts:
        assert host.process is not None and host.process.poll() is None, \
            f"pod {host.name} is gone: the scale-up tests run before the pod-loss tests, which kill pods"
    return list(hosts)


def _join_deadline_s(age_s: float, grace_s: float, cooldown_s: float) -> float:
    """The most a client can take to call an address added to the name it resolves: every connection has been
    GOAWAY'd (age + 10 % jitter + grace), the resolver's cooldown has passed, the new connection is made."""
    return age_s * 1.1 + grace_s + cooldown_s + JOIN_MARGIN_S


def test_a_gateway_added_to_the_name_under_load_gets_calls_within_the_connection_age(network: Network) -> None:
    """Clients resolve ``dns:///``-style targets once and keep their connections; the gateways' max connection age
    sends GOAWAY, the client's round_robin asks its resolver again and finds pod C. No call fails meanwhile."""
    existing, joining = _alive(network.hosts["a"], network.hosts["b"]), _alive(network.hosts["c"])[0]
    network.publish(GATEWAYS, existing)
    target = network.dns_target(GATEWAYS, netns_host.GATEWAY_PORT)
    with client_channel(target, options=[("grpc.dns_min_time_between_resolutions_ms", DNS_COOLDOWN_MS)]) as channel:
        stub = pb_grpc.SegmentAnythingStub(channel)
        image_id = stub.Embed(pb.EmbedRequest(image=new_image()), timeout=60).image_id
        request = pb.SegmentRequest(image_id=image_id, prompts=[p.to_proto() for p in PROMPT])
        decodes = [decoder_count(pod.triton_url) for pod in existing]
        joining_decodes = decoder_count(joining.triton_url)
        with Load(lambda: stub.Segment(request, timeout=60)) as load:
            # Several connection ages of load on the two pods: round robin over both, GOAWAYs cost no call.
            started = time.monotonic()
            wait_until(lambda: load.answered_since(started + 2 * CONNECTION_AGE_S), lambda n: n >= CALLS_BEFORE_KILL,
                       "calls answered over two connection ages", timeout_s=LOAD_BOUND_S)
            assert all(decoder_count(pod.triton_url) > before for pod, before in zip(existing, decodes, strict=True))
            assert decoder_count(joining.triton_url) == joining_decodes  # not in the name: no calls
            network.publish(GATEWAYS, [*existing, joining])
            published_at = time.monotonic()
            limit_s = _join_deadline_s(CONNECTION_AGE_S, CONNECTION_AGE_GRACE_S, DNS_COOLDOWN_MS / 1000)
            wait_until(lambda: decoder_count(joining.triton_url), lambda n: n > joining_decodes,
                       "decoder calls on the pod added to the name", timeout_s=limit_s, interval_s=0.2)
            joined_s = time.monotonic() - published_at
            wait_until(lambda: load.answered_since(published_at + joined_s), lambda n: n >= CALLS_AFTER_KILL,
                       "calls answered after the pod joined", timeout_s=LOAD_BOUND_S)
    assert not load.failures, load.failures
    print(f"\npod {joining.name} added to {GATEWAYS}: first call {joined_s:.1f} s later (connection age "
          f"{CONNECTION_AGE_S:.0f} s + grace {CONNECTION_AGE_GRACE_S:.0f} s); {len(load.answered)} calls over "
          f"{load.answered[-1] - started:.1f} s, 0 failed")


def test_the_gateways_triton_channel_spreads_over_a_name_and_reaches_a_triton_added_to_it(
        network: Network, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A gateway (on the client host, grpc transport) whose SAMSERVE_TRITON_HOST is a DNS name of two pods' Tritons
    sends decoder calls to both (round robin) and, once a third is added to the name, to it within its channel age
    (Triton sends no GOAWAY: the gateway renews its channel). No call fails meanwhile."""
    existing, joining = _alive(network.hosts["a"], network.hosts["b"]), _alive(network.hosts["c"])[0]
    network.publish(TRITONS, existing)
    triton_target = network.dns_target(TRITONS, netns_host.TRITON_GRPC_PORT)
    with GatewayProcess(triton_target, None, tmp_path_factory.mktemp("dns-gateway"), embedding_transport="grpc",
                        triton_channel_max_age_s=TRITON_CHANNEL_AGE_S) as gateway, \
            SamServeClient(gateway.target, timeout_s=60) as client:
        image_id = client.embed(new_image()).image_id
        decodes = [decoder_count(pod.triton_url) for pod in existing]
        joining_decodes = decoder_count(joining.triton_url)
        with Load(lambda: client.segment(image_id, PROMPT)) as load:
            started = time.monotonic()
            wait_until(lambda: load.answered_since(started + 2 * TRITON_CHANNEL_AGE_S),
                       lambda n: n >= CALLS_BEFORE_KILL, "calls answered over two channel ages", timeout_s=LOAD_BOUND_S)
            assert all(decoder_count(pod.triton_url) > before for pod, before in zip(existing, decodes, strict=True))
            assert decoder_count(joining.triton_url) == joining_decodes
            network.publish(TRITONS, [*existing, joining])
            published_at = time.monotonic()
            wait_until(lambda: decoder_count(joining.triton_url), lambda n: n > joining_decodes,
                       "decoder calls on the Triton added to the name", interval_s=0.2,
                       timeout_s=_join_deadline_s(TRITON_CHANNEL_AGE_S, 0.0, 0.0))
            joined_s = time.monotonic() - published_at
            wait_until(lambda: load.answered_since(published_at + joined_s), lambda n: n >= CALLS_AFTER_KILL,
                       "calls answered after the Triton joined", timeout_s=LOAD_BOUND_S)
    assert not load.failures, load.failures
    print(f"\nTriton of pod {joining.name} added to {TRITONS}: first call {joined_s:.1f} s later (channel age "
          f"{TRITON_CHANNEL_AGE_S:.0f} s); {len(load.answered)} calls, 0 failed")


@pytest.mark.parametrize(("victim", "unplug"), [("a", False), ("c", True)], ids=["process-killed", "host-lost"])
def test_a_pod_lost_under_load_costs_no_call(network: Network, victim: str, unplug: bool) -> None:
    """``process-killed``: pod A's processes die, its address refuses connections (calls in flight end at once).
    ``host-lost``: pod C dies and its address goes silent (no reset reaches the client): the client's keepalive
    (samserve.core.service_config) notices within 10 + 5 s. Either way every call is answered, through pod B."""
    pods = [network.hosts[victim], network.hosts["b"]]
    with SamServeClient(",".join(pod.gateway_target for pod in pods), timeout_s=60) as client:
        image_id = client.embed(new_image()).image_id
        decodes = [decoder_count(pod.triton_url) for pod in pods]
        with Load(lambda: client.segment(image_id, PROMPT)) as load:
            wait_until(lambda: len(load.answered), lambda n: n >= CALLS_BEFORE_KILL, "calls answered before the kill")
            # Round robin spread them over both pods.
            assert all(decoder_count(pod.triton_url) > before for pod, before in zip(pods, decodes, strict=True))
            killed_at = time.monotonic()
            network.kill(victim, unplug=unplug)
            wait_until(lambda: load.answered_since(killed_at), lambda n: n >= CALLS_AFTER_KILL,
                       "calls answered after the kill", timeout_s=LOAD_BOUND_S)
    assert not load.failures, load.failures
    times = sorted(load.answered)
    stalled_s = max(later - earlier for earlier, later in zip(times, times[1:], strict=False))
    print(f"\n{victim} lost ({'host' if unplug else 'processes'}): {len(load.answered)} calls, 0 failed, longest gap "
          f"between answers {stalled_s:.2f} s")
