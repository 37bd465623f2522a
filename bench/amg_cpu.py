"""Segment everything: the official ``SamAutomaticMaskGenerator.generate`` vs the GenerateMasks RPC, one run.

Same image (1024x768 synthetic), same weights (vit_b, seeded random), same parameters:

* ``defaults``: the official defaults (points_per_side 32, pred_iou_thresh 0.88, stability 0.95, NMS 0.7);
* ``no_filter``: pred_iou_thresh 0 and stability_score_thresh 0, so that no mask is filtered before NMS: every
  one of the 3072 masks goes through full-resolution post-processing on both sides (our worst case).

Each is timed excluding the encoder (official: the embedding set beforehand, ``set_image``/``reset_image``
no-ops inside ``generate``; ours: the image embedded by an Embed call first, GenerateMasks by image_id) and, for the
defaults, including it (official: plain ``generate``; ours: new PNG bytes of the same pixels, so nothing is cached).

Peak resident memory: the official generator runs in its own process (peak = VmHWM, reset before each call through
/proc/PID/clear_refs); ours is the gateway process plus Triton's process tree (tritonserver and its python-backend
stubs), peaks reset the same way. Both totals include the loaded model.

Writes bench/results/amg_cpu.json. Targets on the 2-core CPU: excluding the encoder >= 3x faster than official;
peak memory no more than official's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, environment, print_table, vit_b_model, write_results  # noqa: E402
from gateway_cpu import png_with_tag  # noqa: E402

SPEEDUP_TARGET = 3.0
CONFIGS = {
    "defaults": {},
    "no_filter": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}


# -- memory of processes --------------------------------------------------------------------------------------
def _status(pid: int, field: str) -> int:
    """Bytes of a VmXXX field of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(c) for c in children)
    return pids


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


def peak_bytes(pids: list[int]) -> int:
    return sum(_status(pid, "VmHWM") for pid in pids)


def rss_bytes(pids: list[int]) -> int:
    return sum(_status(pid, "VmRSS") for pid in pids)


# -- the official side, in its own process --------------------------------------------------------------------
def official_worker(config: str, include_encoder: bool, height: int, width: int) -> None:
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    from samserve_build import architectures
    from samserve_build.synthetic import synthetic_image

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    checkpoint, _, _ = vit_b_model()
    generator = SamAutomaticMaskGenerator(architectures.load_sam("vit_b", checkpoint), output_mode="coco_rle",
                                          **CONFIGS[config])
    image = synthetic_image(height, width, seed=7)
    if not include_encoder:
        generator.predictor.set_image(image)
        generator.predictor.set_image = lambda *a, **k: None  # the embedding is set beforehand
        generator.predictor.reset_image = lambda: None
    pid = [os.getpid()]
    before = rss_bytes(pid)
    reset_peaks(pid)
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "peak_bytes": peak_bytes(pid), "rss_before_bytes": before, "masks": len(records),
        "rles": [r["segmentation"] for r in records],
        "areas": [int(r["area"]) for r in records], "mask_pixels": int(np.sum([r["area"] for r in records])),
    }))


def run_official(config: str, include_encoder: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--official-worker", config, "--height", str(args.height),
               "--width", str(args.width)] + (["--include-encoder"] if include_encoder else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(f"official {config} (encoder {'in' if include_encoder else 'ex'}cluded): {result['seconds']:.2f} s, "
          f"{result['masks']} masks, peak {result['peak_bytes']}", flush=True)
    return result


# -- ours -----------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace) -> tuple[dict, str]:
    from samserve_build import local_stack
    from samserve_build.synthetic import synthetic_image
    from samserve.client import SamServeClient

    _, model_dir, meta = vit_b_model()
    image = synthetic_image(args.height, args.width, seed=7)
    work = WORK / "amg_cpu"
    results: dict[str, dict] = {}
    with local_stack.serve_locally(model_dir, work) as triton, \
            local_stack.GatewayProcess(triton.grpc_url, None, work) as gateway, \
            SamServeClient(gateway.target) as client:
        assert triton.process is not None and gateway.process is not None
        pids = {"gateway": [gateway.process.pid], "triton": process_tree(triton.process.pid)}

        def measured(call) -> dict:
            before = {side: rss_bytes(p) for side, p in pids.items()}
            for p in pids.values():
                reset_peaks(p)
            start = time.perf_counter()
            answer = call()
            seconds = time.perf_counter() - start
            peaks = {side: peak_bytes(p) for side, p in pids.items()}
            print(f"GenerateMasks: {seconds:.2f} s, {len(answer.annotations)} masks, peaks {peaks}", flush=True)
            return {
                "seconds": seconds, "masks": len(answer.annotations),
                "peak_bytes": sum(peaks.values()), "peak_bytes_by_process": peaks,
                "rss_before_bytes": sum(before.values()),
                "rles": [a["segmentation"] for a in answer.annotations],
                "areas": [int(a["area"]) for a in answer.annotations],
            }

        image_id = client.embed(png_with_tag(image, -1)).image_id
        client.generate_masks(image_id, points_per_side=4)  # warm-up of the decoder path
        for config, params in CONFIGS.items():
            results[f"{config}/excluding_encoder"] = measured(lambda: client.generate_masks(image_id, **params))
        results["defaults/including_encoder"] = measured(
            lambda: client.generate_masks(png_with_tag(image, int(time.time())), **CONFIGS["defaults"]))
    return results, meta.model_id


def parity(official: dict, ours: dict) -> dict:
    from tests.amg_reference import match

    result = match(official["rles"], ours["rles"])
    return {"official_masks": result.official, "our_masks": result.ours, "matched_iou_0.95": len(result.pairs),
            "count_ratio": result.count_ratio, "matched_fraction": result.matched_fraction if result.official else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--official-worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--include-encoder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        official_worker(args.official_worker, args.include_encoder, args.height, args.width)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    vit_b_model()  # export once, outside any timing
    ours, model_id = run_ours(args)
    official = {f"{config}/excluding_encoder": run_official(config, False, args) for config in CONFIGS}
    official["defaults/including_encoder"] = run_official("defaults", True, args)

    rows, figures = [], {}
    for key in ours:
        speedup = official[key]["seconds"] / ours[key]["seconds"]
        memory_ratio = ours[key]["peak_bytes"] / official[key]["peak_bytes"]
        figures[key] = {"speedup": speedup, "peak_memory_ratio": memory_ratio,
                        "parity": parity(official[key], ours[key])}
        rows.append([key, official[key]["seconds"], ours[key]["seconds"], speedup,
                     official[key]["peak_bytes"] / 2**20, ours[key]["peak_bytes"] / 2**20,
                     f'{official[key]["masks"]}/{ours[key]["masks"]}'])
    print_table(f"vit_b, seeded random weights, {args.height}x{args.width} image",
                ["case", "official s", "GenerateMasks s", "speedup", "official peak MiB", "ours peak MiB",
                 "masks official/ours"], rows)
    for side in (official, ours):
        for record in side.values():
            record.pop("rles")
    excluded = figures["defaults/excluding_encoder"]
    write_results("amg_cpu.json", {
        "benchmark": "bench/amg_cpu.py",
        "environment": environment(),
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)", "model_id": model_id},
        "image": {"height": args.height, "width": args.width},
        "configs": CONFIGS,
        "stack": "samserve gateway process + Triton (ONNX Runtime fp32, python backend), loopback, no Redis",
        "official": official,
        "ours": ours,
        "figures": figures,
        "targets": {"speedup_excluding_encoder": SPEEDUP_TARGET, "peak_memory_ratio": 1.0},
        "targets_met": {
            "speedup_excluding_encoder": excluded["speedup"] >= SPEEDUP_TARGET,
            "peak_memory_ratio": excluded["peak_memory_ratio"] <= 1.0,
        },
        "note": "Random weights: at the default thresholds no mask survives on either side (the official "
                "generator still upscales all 3072 masks to full resolution first); no_filter keeps every mask "
                "until NMS on both sides.",
    })


if __name__ == "__main__":
    main()
