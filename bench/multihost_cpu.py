"""What an embedding shared between pods costs over a network: two pods and a Redis host in network namespaces.

The set-up of tests/integration/test_multihost.py (tools/samserve_dev/netns.py: namespaces on a bridge; each host runs
Triton + a gateway with the shared-memory transport, or redis-server; a user-space relay at each host adds the link
delay each way, as ``tc netem`` would where the kernel has it), with vit_b (seeded random weights: a 256 x 64 x 64
embedding, 2 MiB in fp16 as the cache stores it). Run as root.

For each link delay (default 0 and 1 ms each way): the Redis round trip from the client host (PING), and per image
id (never seen by pod B) pod B's first Segment (its tier 1 misses: the embedding comes from Redis over the link) and
its second (tier 1), alternating. One image is embedded through pod A; its Redis record is then copied under the
other ids, as pod A would have written them (an encoder run per image would take most of the benchmark's time and
change nothing pod B does). The fetch cost is the difference of the medians; pod B's encoder count (Triton's
statistics) must not move. Writes bench/results/multihost_cpu.json.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

from bench.common import (
    WORK,
    add_image_arguments,
    add_output_argument,
    environment,
    png_bytes,
    print_table,
    summary,
    vit_b_model,
    write_results,
)

DELAYS_MS = (0.0, 1.0)
PINGS = 50
IMAGES = 24


def measure(model_dir: Path, delay_ms: float, args: argparse.Namespace) -> dict[str, object]:
    import redis

    from samserve.client.typed_client import PromptSpec, SamServeClient
    from samserve_dev.images import synthetic_image
    from samserve_dev.netns import Network
    from samserve_dev.triton_stats import encoder_count

    prompt = [PromptSpec(points=[(0.5 * args.width, 0.4 * args.height)], labels=[1])]
    with Network(WORK / f"multihost-{delay_ms:g}ms", delay_ms / 1e3) as network:
        redis_host = network.start_host("redis", "redis")
        pod_a, pod_b = (network.start_host(name, "pod", model_dir=str(model_dir), redis_url=redis_host.redis_url)
                        for name in ("a", "b"))
        pinger = redis.Redis.from_url(redis_host.redis_url)
        pinger.ping()
        round_trips = []
        for _ in range(PINGS):
            started = time.perf_counter()
            pinger.ping()
            round_trips.append(time.perf_counter() - started)
        pinger.close()
        first, second = [], []
        with SamServeClient(pod_a.gateway_target) as client_a, SamServeClient(pod_b.gateway_target) as client_b:
            embedded = client_a.embed(png_bytes(synthetic_image(args.height, args.width, 0))).image_id
            client_b.segment(embedded, prompt)  # warm-up
            encodes_b = encoder_count(pod_b.triton_url)
            store = redis.Redis.from_url(redis_host.redis_url)
            (key,) = [k.decode() for k in store.keys(f"samserve:emb:*:{embedded}")]
            record = store.get(key)
            for seed in range(1, args.images + 1):
                image_id = hashlib.sha256(f"image {seed}".encode()).hexdigest()  # an id pod B never saw
                store.set(key.removesuffix(embedded) + image_id, record)
                for samples in (first, second):
                    started = time.perf_counter()
                    client_b.segment(image_id, prompt)
                    samples.append(time.perf_counter() - started)
            assert encoder_count(pod_b.triton_url) == encodes_b, "pod B ran its encoder"
            store.close()
    fetch_ms = (statistics.median(first) - statistics.median(second)) * 1e3
    print(f"delay {delay_ms:g} ms: Redis RTT {statistics.median(round_trips) * 1e3:.2f} ms, fetch +{fetch_ms:.1f} ms",
          flush=True)
    return {"delay_ms_each_way": delay_ms, "redis_ping": summary(round_trips),
            "segment_tier2_first_on_pod_b": summary(first), "segment_tier1_second_on_pod_b": summary(second),
            "tier2_fetch_ms": fetch_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays-ms", type=float, nargs="+", default=list(DELAYS_MS))
    parser.add_argument("--images", type=int, default=IMAGES)
    add_image_arguments(parser)
    add_output_argument(parser)
    args = parser.parse_args()
    from samserve_dev.netns import check_namespaces

    check_namespaces()
    _, model_dir, meta = vit_b_model()
    links = [measure(model_dir, delay, args) for delay in args.delays_ms]
    print_table("Segment on pod B of an image embedded through pod A (ms, medians)",
                ["delay each way", "Redis RTT", "first (tier 2)", "second (tier 1)", "fetch"],
                [[link["delay_ms_each_way"], link["redis_ping"]["median_ms"],
                  link["segment_tier2_first_on_pod_b"]["median_ms"],
                  link["segment_tier1_second_on_pod_b"]["median_ms"], link["tier2_fetch_ms"]] for link in links])
    write_results("multihost_cpu.json", {
        "benchmark": "bench/multihost_cpu.py",
        "environment": environment(),
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)", "model_id": meta.model_id,
                  "embedding_bytes_fp16": 2 * 256 * 64 * 64},
        "image": {"height": args.height, "width": args.width},
        "stack": "network namespaces on a bridge: Redis host + 2 pods (Triton + gateway, shm transport); the client "
                 "in the root namespace; link delay by a user-space relay at each destination",
        "sampling": {"pings": PINGS, "images": args.images,
                     "order": "per image id: first then second Segment on pod B, after one warm-up image",
                     "embeddings": "one image embedded through pod A, its Redis record copied under each id"},
        "links": links,
    }, args.out)


if __name__ == "__main__":
    main()
