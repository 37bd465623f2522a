"""Throughput of hot Segment RPCs vs the bare Triton decoder (the ceiling), at 1..32 concurrent clients.

Stack: `samserve gateway` process + Triton (vit_b, seeded random weights) + redis-server on loopback; one
embedded image, 1-point multimask prompts. For each concurrency level N, N asyncio workers call back to back for a
fixed time, the gateway and the bare decoder call (embedding staged in shared memory, like the gateway) measured
alternately at each level: ``--windows`` shorter windows per target, in rotated order (with 2: gateway, bare, bare,
gateway at the first level, bare, gateway, gateway, bare at the next, ...), pooled per level and target, so that a
slow phase of the shared machine hits both. Writes throughput_cpu.json and throughput_cpu.png (p50 latency vs
throughput, both lines) to bench/results (or ``--out``).
Target on this CPU: at the knee (the lowest concurrency reaching 90 % of the gateway's best throughput) the
gateway reaches >= 80 % of the bare decoder's throughput, and its p99 <= 3x its p50.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from bench.common import (
    WORK,
    add_output_argument,
    environment,
    print_table,
    rotated_orders,
    shown_path,
    vit_b_model,
    write_results,
)
from samserve.core.api import pb, pb_grpc
from samserve.launch.redis_server import RedisServer
from samserve.triton.models import TritonSam
from samserve.vision import processing
from samserve_dev import local_stack
from samserve_dev.images import synthetic_image

LEVELS = (1, 2, 4, 8, 16, 32)
RATIO_TARGET, TAIL_TARGET = 0.8, 3.0
WARMUP_CALLS = 3
"""Untimed calls of each target, one after the other, before the first window."""


@dataclasses.dataclass
class Window:
    """One window of N workers calling back to back: the latency of every call (s) and the window's wall time (s)."""

    latencies: list[float]
    elapsed: float


async def drive(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> Window:
    """N workers calling back to back for ``seconds`` (each finishes the call it is in at the deadline)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Window(latencies, time.perf_counter() - started)


def pooled(concurrency: int, windows: list[Window]) -> dict[str, object]:
    """One level's row from its windows: throughput (all calls / all windows' time, calls/s), latency percentiles
    of all calls (ms), and each window's throughput."""
    ms = np.concatenate([window.latencies for window in windows]) * 1000
    return {"concurrency": concurrency, "calls": len(ms),
            "throughput_per_s": len(ms) / sum(window.elapsed for window in windows),
            "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "window_throughputs_per_s": [len(window.latencies) / window.elapsed for window in windows]}


def window_orders(names: list[str], levels: tuple[int, ...], windows: int) -> dict[int, list[str]]:
    """Level -> the order of its windows: ``windows`` rounds over ``names`` rotated each round, the first round of
    each level rotated one further than the previous level's (with two names: A B B A, then B A A B, ...)."""
    return {level: [name for round_ in rotated_orders(names, windows, start=index) for name in round_]
            for index, level in enumerate(levels)}


async def sweep(gateway_target: str, triton_url: str, image: np.ndarray, meta, levels: tuple[int, ...],
                seconds: float, windows: int) -> dict:
    """Rows per target (``gateway_segment``, ``bare_decoder``), one per level, the windows alternating as in
    :func:`window_orders`, each ``seconds / windows`` long."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    point = (0.5 * image.shape[1], 0.4 * image.shape[0])
    triton = TritonSam(triton_url)
    await triton.metadata()  # as the gateway does: decoder outputs through shared memory
    try:
        async with grpc.aio.insecure_channel(gateway_target) as channel:
            stub = pb_grpc.SegmentAnythingStub(channel)
            image_id = (await stub.Embed(pb.EmbedRequest(image=buffer.getvalue()))).image_id
            request = pb.SegmentRequest(image_id=image_id, prompts=[pb.Prompt(
                points=[pb.Point(x=point[0], y=point[1], label=pb.POINT_LABEL_FOREGROUND)], multimask_output=True)])
            prepared = processing.prepare_image(image, meta.image_size)
            staged = await triton.stage((await triton.encode(prepared)).round_trip_fp16())  # as the cache serves it
            batch = processing.decoder_batches(
                [processing.Prompt(points=np.array([point]), labels=np.array([1]))],
                prepared.original_size, prepared.input_size, meta.low_res_mask_size)[0]
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "gateway_segment": lambda: stub.Segment(request),
                "bare_decoder": lambda: triton.decode(staged, batch),
            }
            for call in calls.values():
                for _ in range(WARMUP_CALLS):
                    await call()
            rows: dict[str, list[dict]] = {name: [] for name in calls}
            for level, order in window_orders(list(calls), levels, windows).items():
                measured: dict[str, list[Window]] = {name: [] for name in calls}
                for name in order:
                    measured[name].append(await drive(calls[name], level, seconds / windows))
                for name, level_windows in measured.items():
                    rows[name].append(pooled(level, level_windows))
    finally:
        await triton.close()
    return rows


def plot(results: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, color in (("gateway_segment", "gateway hot Segment RPC", "tab:blue"),
                              ("bare_decoder", "bare Triton decoder (ceiling)", "tab:gray")):
        rows = results[key]
        x = [r["throughput_per_s"] for r in rows]
        axis.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{label}, p50")
        axis.plot(x, [r["p99_ms"] for r in rows], "x--", color=color, alpha=0.6, label=f"{label}, p99")
        for r in rows:
            axis.annotate(str(r["concurrency"]), (r["throughput_per_s"], r["p50_ms"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=7, color=color)
    axis.set_xlabel("throughput (calls/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title("samserve on a 2-core CPU: vit_b, 1-point prompts (labels: concurrent clients)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="per concurrency level and target, in all")
    parser.add_argument("--windows", type=int, default=2,
                        help="alternating windows per level and target (each --seconds / --windows long)")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrency levels")
    add_output_argument(parser)
    args = parser.parse_args()
    levels = tuple(args.levels)
    _, model_dir, meta = vit_b_model()
    image = synthetic_image(768, 1024, seed=7)
    work = WORK / "throughput_cpu"
    redis = RedisServer(local_stack.free_port(), work / "redis").start()
    try:
        with local_stack.serve_locally(model_dir, work) as triton, \
                local_stack.GatewayProcess(triton.grpc_url, redis.url, work, health_check_interval_s=1.0) as gateway:
            results = asyncio.run(sweep(gateway.target, triton.grpc_url, image, meta, levels, args.seconds,
                                        args.windows))
    finally:
        redis.stop()
    gateway_rows, bare_rows = results["gateway_segment"], results["bare_decoder"]
    best = max(r["throughput_per_s"] for r in gateway_rows)
    knee = next(i for i, r in enumerate(gateway_rows) if r["throughput_per_s"] >= 0.9 * best)
    ratio = gateway_rows[knee]["throughput_per_s"] / bare_rows[knee]["throughput_per_s"]
    tail = gateway_rows[knee]["p99_ms"] / gateway_rows[knee]["p50_ms"]
    rows = [[g["concurrency"], g["throughput_per_s"], g["p50_ms"], g["p99_ms"], b["throughput_per_s"], b["p50_ms"],
             b["p99_ms"], g["throughput_per_s"] / b["throughput_per_s"]]
            for g, b in zip(gateway_rows, bare_rows, strict=True)]
    print_table("hot Segment through the gateway vs bare Triton decoder (vit_b, 768x1024, 2-core CPU)",
                ["clients", "gw calls/s", "gw p50 ms", "gw p99 ms", "bare calls/s", "bare p50", "bare p99", "ratio"],
                rows)
    knee_row = gateway_rows[knee]
    print(f"\nknee: {knee_row['concurrency']} clients, {knee_row['throughput_per_s']:.1f} calls/s = "
          f"{ratio:.2f} of the bare decoder (target >= {RATIO_TARGET}); p99/p50 {tail:.2f} (target <= {TAIL_TARGET})")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "throughput_cpu.png"
    plot(results, plot_path)
    write_results("throughput_cpu.json", {
        "benchmark": "bench/throughput_cpu.py",
        "environment": environment(),
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)", "model_id": meta.model_id},
        "seconds_per_level": args.seconds,
        "sampling": {
            "scheme": "alternating",
            "description": "at each level the gateway and the bare decoder measured in alternating windows "
                           "(order below), pooled per level and target: throughput = calls / summed window time",
            "windows_per_level_and_target": args.windows,
            "seconds_per_window": args.seconds / args.windows,
            "warmup_calls_per_target": WARMUP_CALLS,
            "window_order": {str(level): order
                             for level, order in window_orders(list(results), levels, args.windows).items()},
        },
        "results": results,
        "knee": {"concurrency": gateway_rows[knee]["concurrency"],
                 "gateway_throughput_per_s": gateway_rows[knee]["throughput_per_s"],
                 "bare_throughput_per_s": bare_rows[knee]["throughput_per_s"],
                 "ratio_to_ceiling": ratio, "p99_over_p50": tail},
        "targets": {"ratio_to_ceiling": RATIO_TARGET, "p99_over_p50": TAIL_TARGET},
        "targets_met": {"ratio_to_ceiling": ratio >= RATIO_TARGET, "p99_over_p50": tail <= TAIL_TARGET},
        "plot": shown_path(plot_path),
    }, args.out)


if __name__ == "__main__":
    main()
