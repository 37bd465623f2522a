"""The gateway end to end: real `samserve gateway` processes, real Triton, real Redis, real gRPC channels."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core import model_spec
from samserve.core.api import SERVICE_NAME, pb
from samserve.launch.redis_server import RedisServer
from samserve_dev.images import new_image, png_bytes, synthetic_image
from samserve_dev.local_stack import free_port
from samserve_dev.metrics import sample, scrape
from samserve_dev.polling import wait_until
from samserve_dev.triton_stats import encoder_count


def test_segment_with_bytes_equals_segment_by_id_and_both_encodings(gateway):
    data = new_image()
    prompts = [PromptSpec(points=[(80, 60)], labels=[1]), PromptSpec(box=(10, 10, 120, 90), multimask_output=False)]
    with SamServeClient(gateway.target) as client:
        by_bytes = client.segment(data, prompts, encoding=pb.MASK_ENCODING_RLE_AND_PNG)
        embedded = client.embed(data)
        assert embedded.cached
        by_id = client.segment(embedded.image_id, prompts, encoding=pb.MASK_ENCODING_PNG)
        raw = client.segment_raw(pb.SegmentRequest(image_id=embedded.image_id, prompts=[p.to_proto() for p in prompts],
                                                   mask_encoding=pb.MASK_ENCODING_RLE_AND_PNG))
    for a, b in zip(by_bytes, by_id, strict=True):
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.predicted_iou, b.predicted_iou)
    mask = raw.results[0].masks[0]
    assert mask.rle.size == [120, 160] and mask.png  # both encodings present
    assert mask.area == int(by_id[0].masks[0].sum())
    assert raw.cached and raw.image_id == embedded.image_id


def test_second_segment_runs_no_encoder_and_restart_finds_redis(gateway_factory, tiny_triton, redis_server):
    data = new_image()
    prompt = [PromptSpec(points=[(50, 50)], labels=[1])]
    first = gateway_factory(tiny_triton.url, redis_server.url)
    before = encoder_count(tiny_triton.url)
    with SamServeClient(first.target) as client:
        client.segment(data, prompt)
        assert encoder_count(tiny_triton.url) == before + 1
        client.segment(data, prompt)
        image_id = client.embed(data).image_id
    assert encoder_count(tiny_triton.url) == before + 1
    assert first.stop() == 0  # graceful SIGTERM exit
    restarted = gateway_factory(tiny_triton.url, redis_server.url)
    with SamServeClient(restarted.target) as client:
        (answer,) = client.segment(image_id, prompt)  # tier 1 is empty: found in Redis
        assert answer.masks.shape == (3, 120, 160)
        assert client.embed(data).cached
    assert encoder_count(tiny_triton.url) == before + 1


def test_segment_by_id_re_embeds_from_the_kept_bytes_when_the_embedding_is_gone(gateway_factory, tiny_triton,
                                                                                redis_server):
    """An image_id is a full handle: with its embedding gone from Redis and a cold tier 1 (another gateway), Segment
    by id encodes the image again from the bytes kept next to the embedding, and answers as before."""
    data = new_image()
    prompt = [PromptSpec(points=[(50, 50)], labels=[1])]
    first = gateway_factory(tiny_triton.url, redis_server.url)
    with SamServeClient(first.target) as client:
        image_id = client.embed(data).image_id
        (expected,) = client.segment(image_id, prompt)
    namespace = tiny_triton.model.metadata.cache_namespace
    with redis_server.client() as store:
        assert store.get(f"samserve:img:{image_id}") == data
        assert store.delete(f"samserve:emb:{namespace}:{image_id}") == 1
    fresh = gateway_factory(tiny_triton.url, redis_server.url)
    before = encoder_count(tiny_triton.url)
    with SamServeClient(fresh.target) as client:
        (answer,) = client.segment(image_id, prompt)
        code, details = _code(lambda: client.segment("f" * 64, prompt))  # never seen: neither embedding nor bytes
    assert encoder_count(tiny_triton.url) == before + 1
    np.testing.assert_array_equal(answer.masks, expected.masks)
    np.testing.assert_array_equal(answer.predicted_iou, expected.predicted_iou)
    assert code == grpc.StatusCode.NOT_FOUND and "send the image bytes again" in details
    samples = scrape(fresh.metrics_url)
    assert sample(samples, "samserve_image_store_lookups_total", tier="l2", result="hit") == 1
    assert sample(samples, "samserve_image_store_lookups_total", tier="l2", result="miss") == 1
    assert sample(samples, "samserve_image_store_lookups_total", tier="l2", result="error") == 0


def test_a_redis_restart_then_a_gateway_restart_needs_no_resend(gateway_factory, tiny_triton, tmp_path):
    """Redis restarts empty while gateways serve from tier 1; a gateway that writes tier 1 back (marker check every
    0.2 s) keeps its ids valid for a freshly started gateway, bytes and embedding both (no encoder run); the ids of
    a gateway that does not write back (check off) are lost, which shows the restart did lose them."""
    redis = RedisServer(free_port(), tmp_path / "redis").start()
    keeper = gateway_factory(tiny_triton.url, redis.url, redis_refill_check_s=0.2)
    forgetter = gateway_factory(tiny_triton.url, redis.url, redis_refill_check_s=0)
    prompt = [PromptSpec(points=[(50, 50)], labels=[1])]
    with SamServeClient(keeper.target) as client:
        kept = client.embed(data := new_image()).image_id
        (expected,) = client.segment(kept, prompt)
    with SamServeClient(forgetter.target) as client:
        lost = client.embed(new_image()).image_id
    redis.stop()
    redis.start()  # no persistence: it comes back empty
    with redis.client() as store:
        wait_until(lambda: store.get(f"samserve:img:{kept}"), lambda value: value == data, "the written-back bytes",
                   timeout_s=20)
        namespace = tiny_triton.model.metadata.cache_namespace
        wait_until(lambda: store.exists(f"samserve:emb:{namespace}:{kept}"), bool, "the written-back embedding",
                   timeout_s=20)
    refilled = scrape(keeper.metrics_url)
    assert sample(refilled, "samserve_tier2_refilled_total", kind="image") == 1
    assert sample(refilled, "samserve_tier2_refilled_total", kind="embedding") == 1
    restarted = gateway_factory(tiny_triton.url, redis.url)
    before = encoder_count(tiny_triton.url)
    with SamServeClient(restarted.target) as client:
        (answer,) = client.segment(kept, prompt)
        code, details = _code(lambda: client.segment(lost, prompt))
    assert encoder_count(tiny_triton.url) == before  # the embedding itself came back from Redis
    np.testing.assert_array_equal(answer.masks, expected.masks)
    assert code == grpc.StatusCode.NOT_FOUND and "send the image bytes again" in details
    redis.stop()


def _concurrent_segments(targets: list[str], data: bytes, calls: int) -> list:
    barrier = threading.Barrier(calls)

    def call(i: int):
        with SamServeClient(targets[i % len(targets)]) as client:
            barrier.wait()
            return client.segment(data, [PromptSpec(points=[(40, 40)], labels=[1])])

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(call, range(calls)))


def test_sixteen_concurrent_segments_on_a_new_image_run_one_encoder(gateway, tiny_triton):
    before = encoder_count(tiny_triton.url)
    results = _concurrent_segments([gateway.target], new_image(), 16)
    assert encoder_count(tiny_triton.url) == before + 1
    assert all(np.array_equal(r[0].masks, results[0][0].masks) for r in results)


def test_two_gateways_sharing_redis_run_one_encoder_between_them(gateway, gateway_factory, tiny_triton, redis_server):
    second = gateway_factory(tiny_triton.url, redis_server.url)
    before = encoder_count(tiny_triton.url)
    results = _concurrent_segments([gateway.target, second.target], new_image(200, 260), 8)
    assert encoder_count(tiny_triton.url) == before + 1
    assert all(np.array_equal(r[0].masks, results[0][0].masks) for r in results)


def test_redis_stopped_mid_test_segment_still_succeeds(gateway_factory, tiny_triton, tmp_path):
    redis = RedisServer(free_port(), tmp_path / "redis").start()
    gateway = gateway_factory(tiny_triton.url, redis.url, redis_timeout_s=0.5)
    with SamServeClient(gateway.target) as client:
        assert client.segment(new_image(), [PromptSpec(points=[(30, 30)], labels=[1])])
        redis.stop()
        data = new_image()
        (answer,) = client.segment(data, [PromptSpec(points=[(30, 30)], labels=[1])])
        assert answer.masks.shape == (3, 120, 160)
        assert client.embed(data).cached  # tier 1 still serves it
    assert "redis" in gateway.log().lower() and "failed" in gateway.log()


def test_same_pixels_different_bytes_get_different_ids(gateway):
    pixels = synthetic_image(64, 80, seed=77)
    with SamServeClient(gateway.target) as client:
        a = client.embed(png_bytes(pixels, compress_level=1))
        b = client.embed(png_bytes(pixels, compress_level=9))
    assert a.image_id != b.image_id and not b.cached


def test_exif_orientation_is_applied(gateway):
    """A phone JPEG stored landscape with 'rotate 90' EXIF is served in the orientation a person sees."""
    stored = synthetic_image(60, 100, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif.tobytes())
    with SamServeClient(gateway.target) as client:
        embedded = client.embed(buffer.getvalue())
        (answer,) = client.segment(embedded.image_id, [PromptSpec(points=[(30, 90)], labels=[1])])
    assert (embedded.width, embedded.height) == (60, 100)
    assert answer.masks.shape[1:] == (100, 60)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF"])
def test_accepted_formats(gateway, fmt):
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(50, 70, seed=9)).save(buffer, fmt)
    with SamServeClient(gateway.target) as client:
        embedded = client.embed(buffer.getvalue())
    assert (embedded.width, embedded.height) == (70, 50)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_errors_have_precise_status_codes(gateway, tiny_triton):
    data = new_image()
    low_res = tiny_triton.model.metadata.low_res_mask_size
    with SamServeClient(gateway.target) as client:
        image_id = client.embed(data).image_id
        invalid = grpc.StatusCode.INVALID_ARGUMENT

        def segment(*prompts: pb.Prompt):
            return client.segment_raw(pb.SegmentRequest(image_id=image_id, prompts=list(prompts)))

        def point(x, y, label=pb.POINT_LABEL_FOREGROUND):
            return pb.Point(x=x, y=y, label=label)

        cases = {
            "empty image": (lambda: client.embed(b""), "empty image"),
            "undecodable": (lambda: client.embed(b"definitely not an image"), "undecodable"),
            "zero prompts": (lambda: segment(), "at least one prompt"),
            "no points nor box": (lambda: segment(pb.Prompt(multimask_output=True)), "neither points nor a box"),
            "nan": (lambda: segment(pb.Prompt(points=[point(float("nan"), 3)])), "not finite"),
            "inf box": (lambda: segment(pb.Prompt(box=pb.Box(x0=0, y0=0, x1=float("inf"), y1=5))), "not finite"),
            "outside": (lambda: segment(pb.Prompt(points=[point(161, 3)])), "outside"),
            "negative": (lambda: segment(pb.Prompt(points=[point(-1, 3)])), "outside"),
            "box outside": (lambda: segment(pb.Prompt(box=pb.Box(x0=0, y0=0, x1=10, y1=500))), "box must satisfy"),
            "inverted box": (lambda: segment(pb.Prompt(box=pb.Box(x0=50, y0=0, x1=10, y1=5))), "box must satisfy"),
            "bad label": (lambda: segment(pb.Prompt(points=[point(3, 3, pb.POINT_LABEL_UNSPECIFIED)])), "label"),
            "unknown label": (lambda: segment(pb.Prompt(points=[point(3, 3, 7)])), "label"),
            "too many points": (lambda: segment(pb.Prompt(points=[point(3, 3)] * 65)), "limit is 64"),
            "mask size": (lambda: segment(pb.Prompt(points=[point(3, 3)], mask_input=pb.LowResLogits(
                height=low_res[0] + 1, width=low_res[1], data=b"\0" * 4 * (low_res[0] + 1) * low_res[1]))),
                "mask_input"),
            "no image": (lambda: client.segment_raw(pb.SegmentRequest(prompts=[pb.Prompt(points=[point(1, 1)])])),
                         "image_bytes or image_id"),
        }
        for name, (call, message) in cases.items():
            code, details = _code(call)
            assert code == invalid, (name, code, details)
            assert message in details, (name, details)
        code, details = _code(lambda: client.segment("0" * 64, [PromptSpec(points=[(1, 1)], labels=[1])]))
        assert code == grpc.StatusCode.NOT_FOUND and "send the image bytes again" in details


def test_pixel_limit_and_request_size(gateway_factory, tiny_triton, redis_server):
    """(A full encode queue is tests/integration/test_server.py's: it holds the encode slot itself.)"""
    gateway = gateway_factory(tiny_triton.url, redis_server.url, max_image_pixels=10_000, max_request_bytes=200_000)
    with SamServeClient(gateway.target) as client:
        code, details = _code(lambda: client.embed(new_image(101, 100)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in details
        big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
        code, _ = _code(lambda: client.embed(png_bytes(big)))  # ~270 kB of incompressible PNG
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.embed(new_image(90, 100)).width == 100  # under both limits


def test_unavailable_without_triton_and_health(gateway_factory, redis_server, gateway):
    nowhere = gateway_factory(f"127.0.0.1:{free_port()}", redis_server.url, wait_serving=False)
    assert nowhere.health() == "NOT_SERVING"
    assert nowhere.health(SERVICE_NAME) == "NOT_SERVING"
    with SamServeClient(nowhere.target) as client:
        code, details = _code(lambda: client.embed(new_image()))
    assert code == grpc.StatusCode.UNAVAILABLE and "not ready" in details
    assert gateway.health() == "SERVING" and gateway.health(SERVICE_NAME) == "SERVING"


def test_corrupt_redis_record_is_recomputed(gateway, gateway_factory, tiny_triton, redis_server):
    import redis

    data = new_image()
    with SamServeClient(gateway.target) as client:
        image_id = client.embed(data).image_id
    namespace = tiny_triton.model.metadata.cache_namespace
    store = redis.Redis.from_url(redis_server.url)
    key = f"samserve:emb:{namespace}:{image_id}"
    assert store.exists(key)
    store.set(key, b"SAME" + b"\x01" * 40)
    store.close()
    fresh = gateway_factory(tiny_triton.url, redis_server.url)  # empty tier 1: must read tier 2
    before = encoder_count(tiny_triton.url)
    with SamServeClient(fresh.target) as client:
        (answer,) = client.segment(data, [PromptSpec(points=[(20, 20)], labels=[1])])
    assert answer.masks.shape == (3, 120, 160)
    assert encoder_count(tiny_triton.url) == before + 1
    assert "record decode failed" in fresh.log()


def cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free cluster port")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three real redis-server nodes joined into a Redis Cluster with redis-cli."""
    import shutil
    import subprocess

    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing (Debian's redis-tools, installed with redis-server)")
    import redis

    root = tmp_path_factory.mktemp("cluster")
    nodes = [RedisServer(cluster_port(), root / str(i), extra_args=(
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")) for i in range(3)]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:  # each start waits out redis-py's connection retries
            list(pool.map(RedisServer.start, nodes))
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        probe = redis.Redis(port=nodes[0].port)
        wait_until(lambda: probe.cluster("info").get("cluster_state"), lambda state: state == "ok", "cluster_state")
        probe.close()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_redis_cluster_tier_two_and_single_flight(gateway_factory, tiny_triton, redis_cluster):
    url = redis_cluster[1].url
    first = gateway_factory(tiny_triton.url, url, redis_cluster="true")
    second = gateway_factory(tiny_triton.url, url, redis_cluster="true")
    before = encoder_count(tiny_triton.url)
    data = new_image(150, 150)
    _concurrent_segments([first.target, second.target], data, 6)
    assert encoder_count(tiny_triton.url) == before + 1
    third = gateway_factory(tiny_triton.url, url, redis_cluster="true")
    with SamServeClient(third.target) as client:
        assert client.embed(data).cached
    assert encoder_count(tiny_triton.url) == before + 1
    assert "failed" not in first.log() + second.log() + third.log()


def test_triton_restart_unavailable_then_recovers_from_redis(gateway_factory, tiny_model, redis_server, tmp_path):
    """Triton goes away (UNAVAILABLE, NOT_SERVING) and comes back: tier 1's shared-memory regions are gone with
    it, so the gateway starts tier 1 afresh and serves the image again from Redis without re-encoding."""
    from samserve.launch import triton_server
    from samserve_build.repository import write_repository

    repo = write_repository(tiny_model.directory, tmp_path / "repo")
    server = triton_server.TritonServer(repo, tmp_path / "work", free_port(), free_port(), free_port())
    models = (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)
    server.start()
    try:
        server.wait_ready(120, models)
        gateway = gateway_factory(server.grpc_url, redis_server.url)
        data = new_image()
        prompt = [PromptSpec(points=[(60, 60)], labels=[1])]
        with SamServeClient(gateway.target) as client:
            image_id = client.embed(data).image_id
            (before,) = client.segment(image_id, prompt)
            server.stop()
            wait_until(gateway.health, lambda status: status == "NOT_SERVING", "gateway health", timeout_s=30)
            code, _ = _code(lambda: client.segment(image_id, prompt))
            assert code == grpc.StatusCode.UNAVAILABLE
            server.start()
            server.wait_ready(120, models)
            wait_until(gateway.health, lambda status: status == "SERVING", "gateway health", timeout_s=60)
            (after,) = client.segment(image_id, prompt)
            np.testing.assert_array_equal(before.masks, after.masks)
        assert encoder_count(server.grpc_url) == 0  # the fresh Triton never encoded: the embedding came from Redis
    finally:
        server.stop()


def test_a_crashed_holders_lock_expires(gateway, tiny_triton, redis_server):
    """A replica died holding the single-flight lock of an image: the lock expires and the next request
    encodes the image itself instead of waiting forever."""
    import hashlib

    import redis

    data = new_image()
    namespace = tiny_triton.model.metadata.cache_namespace
    lock = f"samserve:emb:{namespace}:{hashlib.sha256(data).hexdigest()}:lock"
    store = redis.Redis.from_url(redis_server.url)
    waits = lambda: sample(scrape(gateway.metrics_url), "samserve_single_flight_waits_total")  # noqa: E731
    waits_before = waits()
    assert store.set(lock, "crashed-replica", nx=True, px=3000)
    before = encoder_count(tiny_triton.url)
    with SamServeClient(gateway.target) as client:
        embedded = client.embed(data)
    assert waits() == waits_before + 1  # it found the lock held and waited for it (not: the lock was already gone)
    assert not embedded.cached
    assert encoder_count(tiny_triton.url) == before + 1
    assert not store.exists(lock)
    store.close()


def test_redis_launcher_refuses_a_port_that_something_answers_on(redis_server, tmp_path):
    from samserve.launch.redis_server import RedisStartError

    with pytest.raises(RedisStartError, match="already answers"):
        RedisServer(redis_server.port, tmp_path).start()


def redis_answers(url: str, within_s: float = 0.5) -> bool:
    """Whether Redis answers a PING within ``within_s`` (it does not while DEBUG SLEEP blocks it)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=within_s)
    try:
        return bool(client.ping())
    except redis.TimeoutError:
        return False
    finally:
        client.close()


def test_slow_redis_does_not_fail_requests(gateway_factory, tiny_triton, tmp_path):
    """Redis blocked (DEBUG SLEEP) while a new image arrives: the request succeeds (the embedding is computed
    locally) while Redis is still blocked, i.e. bounded by the Redis timeout (0.3 s per operation), not by Redis;
    and the failure is logged."""
    import redis

    server = RedisServer(free_port(), tmp_path / "redis", extra_args=("--enable-debug-command", "yes")).start()
    try:
        gateway = gateway_factory(tiny_triton.url, server.url, redis_timeout_s=0.3)
        blocker = threading.Thread(
            target=lambda: redis.Redis.from_url(server.url, socket_timeout=30).execute_command("DEBUG", "SLEEP", "8"))
        with SamServeClient(gateway.target, timeout_s=30) as client:
            blocker.start()
            wait_until(lambda: redis_answers(server.url), lambda answers: not answers, "Redis answering PING")
            started = time.monotonic()
            (answer,) = client.segment(new_image(), [PromptSpec(points=[(30, 30)], labels=[1])])
            took_s = time.monotonic() - started
            assert answer.masks.shape == (3, 120, 160)
            # Answered before Redis came back: the gateway waited for its timeouts, never for Redis itself.
            assert blocker.is_alive(), f"the call took {took_s:.1f} s: it waited for Redis"
        blocker.join()
        assert "TimeoutError" in gateway.log() or "timed out" in gateway.log().lower()
    finally:
        server.stop()
