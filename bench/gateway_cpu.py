"""The gateway vs the official SamPredictor, side by side in one run (vit_b, seeded random weights, one image).

* cold: Embed RPC of new bytes (same pixels, a different PNG text chunk each time, so nothing is cached; all PNGs
  encoded before the timed section, so only the RPC is timed) vs ``SamPredictor.set_image``;
* hot: Segment RPC by image_id (1 point, multimask, COCO RLE) vs ``SamPredictor.predict`` (incl. its mask
  postprocessing), and the bare Triton decoder call (shared-memory embedding) that the gateway wraps; the same
  Segment over HTTP/JSON (a kept-alive connection), for what the HTTP transport adds.

The calls compared are timed interleaved (cold: set_image and Embed; hot: predict, Segment and the bare decoder):
round robin, the order rotated each round, the same warm-up rounds for each, so that a slow phase of the shared
machine hits all of them alike. Real stack: Triton, redis-server and a `samserve gateway` process on loopback.
Writes gateway_cpu.json to bench/results (or ``--out``). Targets on the 2-core CPU: hot Segment p50 <= 0.75x
official predict; cold/hot latency ratio >= 100; gateway overhead (hot Segment p50 - bare decoder p50) <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import io

import httpx
import numpy as np
from google.protobuf import json_format
from PIL import Image, PngImagePlugin

from bench.common import (
    WORK,
    add_image_arguments,
    add_output_argument,
    environment,
    interleaved_samples,
    print_table,
    sampling_record,
    scene,
    summary,
    triton_client,
    write_results,
)
from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import pb
from samserve.launch.redis_server import RedisServer
from samserve.vision import processing
from samserve_dev import local_stack

HOT_TARGET, COLD_HOT_TARGET, OVERHEAD_TARGET_MS = 0.75, 100.0, 5.0
COLD_WARMUP, HOT_WARMUP = 1, 3
"""Untimed rounds before the timed ones (every call of a phase once per round)."""


def png_with_tag(image: np.ndarray, tag: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("samserve-bench", str(tag))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--hot-repeats", type=int, default=200)
    add_image_arguments(parser)
    add_output_argument(parser)
    args = parser.parse_args()
    setup = scene(args)
    model_dir, meta, image = setup.model_dir, setup.meta, setup.image
    point, label, predictor = setup.point, setup.label, setup.predictor
    work = WORK / "gateway_cpu"
    redis = RedisServer(local_stack.free_port(), work / "redis").start()
    try:
        with local_stack.serve_locally(model_dir, work) as triton, \
                local_stack.GatewayProcess(triton.grpc_url, redis.url, work, health_check_interval_s=1.0) as gateway, \
                SamServeClient(gateway.target) as client, httpx.Client(base_url=gateway.http_url) as http:
            # Cold: every Embed gets new bytes of the same pixels (a cache miss), encoded here, outside the timing.
            pngs = iter([png_with_tag(image, tag) for tag in range(COLD_WARMUP + args.cold_repeats)])
            cold = interleaved_samples({
                "official_set_image": lambda: predictor.set_image(image),
                "cold_embed_rpc": lambda: client.embed(next(pngs)),
            }, args.cold_repeats, warmup=COLD_WARMUP)
            image_id = client.embed(png_with_tag(image, -1)).image_id
            request = pb.SegmentRequest(image_id=image_id, mask_encoding=pb.MASK_ENCODING_RLE,
                                        prompts=[PromptSpec(points=[tuple(point[0])], labels=[1]).to_proto()])
            http_request = json_format.MessageToJson(request)

            def segment_over_http() -> None:
                response = http.post("/v1/images:segment", content=http_request,
                                     headers={"content-type": "application/json"})
                response.raise_for_status()
                json_format.Parse(response.text, pb.SegmentResponse())

            # Hot: predict (on the features of the last set_image: the same image), the Segment RPC and the bare
            # decoder call that the gateway wraps (same fp16-rounded embedding, staged in shared memory).
            with asyncio.Runner() as runner:
                bare_client = triton_client(runner, triton.grpc_url)
                prepared = processing.prepare_image(image, meta.image_size)
                encoded = runner.run(bare_client.encode(prepared))
                staged = runner.run(bare_client.stage(encoded.round_trip_fp16()))  # as the cache serves it
                batch = processing.decoder_batches(
                    [processing.Prompt(points=point, labels=label)], prepared.original_size,
                    prepared.input_size, meta.low_res_mask_size)[0]
                hot = interleaved_samples({
                    "official_predict": lambda: predictor.predict(point, label, multimask_output=True),
                    "hot_segment_rpc": lambda: client.segment_raw(request),
                    "hot_segment_http": segment_over_http,
                    "bare_triton_decoder": lambda: runner.run(bare_client.decode(staged, batch)),
                }, args.hot_repeats, warmup=HOT_WARMUP)
                runner.run(bare_client.close())
            masks, _, _ = predictor.predict(point, label, multimask_output=True)
            (answer,) = client.segment(image_id, [PromptSpec(points=[tuple(point[0])], labels=[1])])
            agreement = [float((masks[k] == answer.masks[k]).mean()) for k in range(len(masks))]
    finally:
        redis.stop()

    results = {name: summary(samples) for name, samples in (cold | hot).items()}
    hot_ratio = results["hot_segment_rpc"]["median_ms"] / results["official_predict"]["median_ms"]
    cold_hot = results["cold_embed_rpc"]["median_ms"] / results["hot_segment_rpc"]["median_ms"]
    overhead = results["hot_segment_rpc"]["median_ms"] - results["bare_triton_decoder"]["median_ms"]
    http_over_grpc = results["hot_segment_http"]["median_ms"] - results["hot_segment_rpc"]["median_ms"]
    rows = [[name, r["median_ms"], r["p90_ms"], r["p99_ms"], r["n"]] for name, r in results.items()]
    print_table(f"vit_b, seeded random weights, {args.height}x{args.width} image (ms)",
                ["call", "p50", "p90", "p99", "n"], rows)
    print_table("targets", ["figure", "value", "target"], [
        ["hot Segment p50 / official predict p50", hot_ratio, f"<= {HOT_TARGET}"],
        ["cold Embed p50 / hot Segment p50", cold_hot, f">= {COLD_HOT_TARGET}"],
        ["gateway overhead (hot Segment - bare decoder), ms", overhead, f"<= {OVERHEAD_TARGET_MS}"],
        ["HTTP/JSON over gRPC (hot Segment p50 difference), ms", http_over_grpc, "(no target)"],
    ])
    write_results("gateway_cpu.json", {
        "benchmark": "bench/gateway_cpu.py",
        "environment": environment(),
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)", "model_id": meta.model_id},
        "image": {"height": args.height, "width": args.width},
        "stack": "samserve gateway process + Triton (ONNX Runtime fp32, python backend) + redis-server, loopback",
        "sampling": {
            "cold": sampling_record(list(cold), args.cold_repeats, COLD_WARMUP)
            | {"embed_bytes": "each call new PNG bytes of the same pixels, encoded before the timed section"},
            "hot": sampling_record(list(hot), args.hot_repeats, HOT_WARMUP),
        },
        "results": results,
        "figures": {"hot_over_official_predict": hot_ratio, "cold_over_hot": cold_hot,
                    "gateway_overhead_ms": overhead, "http_over_grpc_ms": http_over_grpc},
        "targets": {"hot_over_official_predict": HOT_TARGET, "cold_over_hot": COLD_HOT_TARGET,
                    "gateway_overhead_ms": OVERHEAD_TARGET_MS},
        "targets_met": {"hot_over_official_predict": hot_ratio <= HOT_TARGET,
                        "cold_over_hot": cold_hot >= COLD_HOT_TARGET,
                        "gateway_overhead_ms": overhead <= OVERHEAD_TARGET_MS},
        "mask_pixel_agreement_with_official": agreement,
    }, args.out)


if __name__ == "__main__":
    main()
