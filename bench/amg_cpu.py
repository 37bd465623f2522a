"""Segment everything: the official ``SamAutomaticMaskGenerator.generate`` vs the GenerateMasks RPC, one run.

Same image (1024x768 synthetic), same weights (vit_b, seeded random), same parameters:

* ``defaults``: the official defaults (points_per_side 32, pred_iou_thresh 0.88, stability 0.95, NMS 0.7);
* ``no_filter``: pred_iou_thresh 0 and stability_score_thresh 0, so that no mask is filtered before NMS: every
  one of the 3072 masks goes through full-resolution post-processing on both sides (our worst case).

Each is timed excluding the encoder (official: the embedding set beforehand, ``set_image``/``reset_image``
no-ops inside ``generate``; ours: the image embedded by an Embed call first, GenerateMasks by image_id) and, for the
defaults, including it (official: plain ``generate``; ours: new PNG bytes of the same pixels, so nothing is cached).

Peak resident memory: the proportional set size (PSS: a page shared by k processes counts 1/k in each, so shared
memory counts once) sampled every 50 ms during the call: the official generator's own process, and for ours the
gateway process plus Triton's process tree (tritonserver and its python-backend stubs) together. Both include the
loaded model; ours also the resident encoder, idle during the call.

Writes bench/results/amg_cpu.json. Targets on the 2-core CPU: excluding the encoder >= 3x faster than official;
peak memory no more than official's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.support

from common import WORK, environment, print_table, vit_b_model, write_results  # noqa: E402
from gateway_cpu import png_with_tag  # noqa: E402

SPEEDUP_TARGET = 3.0
CONFIGS = {
    "defaults": {},
    "no_filter": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}


# -- memory of processes --------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            todo.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of the processes together: a page shared by k of them (Triton's shared-memory
    regions, the python backend's tensor pool) counts 1/k in each, so the sum counts it once."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakMemory:
    """Samples the PSS of groups of processes every ``interval_s`` in a thread: ``peak`` (all groups together),
    ``peak_by_group`` (each group's own peak), ``before`` (all groups, at the start)."""

    def __init__(self, groups: dict[str, list[int]], interval_s: float = 0.05) -> None:
        self.groups, self.interval_s = groups, interval_s
        self.peak_by_group = {name: pss_bytes(pids) for name, pids in groups.items()}
        self.peak = self.before = sum(self.peak_by_group.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample_once(self) -> None:
        sizes = {name: pss_bytes(pids) for name, pids in self.groups.items()}
        self.peak = max(self.peak, sum(sizes.values()))
        for name, size in sizes.items():
            self.peak_by_group[name] = max(self.peak_by_group[name], size)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()


# -- the official side, in its own process --------------------------------------------------------------------
def official_worker(config: str, include_encoder: bool, sample_memory: bool, height: int, width: int) -> None:
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    from samserve_build import architectures
    from tests.support.images import synthetic_image

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
    memory = PeakMemory({"official": [os.getpid()]}) if sample_memory else contextlib.nullcontext()
    with memory:
        start = time.perf_counter()
        records = generator.generate(image)
        seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "masks": len(records),
        **({"peak_bytes": memory.peak, "before_bytes": memory.before} if sample_memory else {}),
        "rles": [r["segmentation"] for r in records],
        "areas": [int(r["area"]) for r in records], "mask_pixels": int(np.sum([r["area"] for r in records])),
    }))


def run_official(config: str, include_encoder: bool, args: argparse.Namespace, sample_memory: bool = False) -> dict:
    command = [sys.executable, __file__, "--official-worker", config, "--height", str(args.height),
               "--width", str(args.width)] + (["--include-encoder"] if include_encoder else []) + \
              (["--sample-memory"] if sample_memory else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(f"official {config} (encoder {'in' if include_encoder else 'ex'}cluded): {result['seconds']:.2f} s, "
          f"{result['masks']} masks, peak {result.get('peak_bytes')}", flush=True)
    return result


# -- ours -----------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace) -> tuple[dict, str]:
    from samserve.client import SamServeClient
    from tests.support import local_stack
    from tests.support.images import synthetic_image

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
            """Timed without sampling (the sampler costs CPU); a second identical call for peak memory."""
            start = time.perf_counter()
            answer = call()
            seconds = time.perf_counter() - start
            with PeakMemory(pids) as memory:
                call()
            print(f"GenerateMasks: {seconds:.2f} s, {len(answer.annotations)} masks, peak {memory.peak}, by process "
                  f"{memory.peak_by_group}", flush=True)
            return {
                "seconds": seconds, "masks": len(answer.annotations), "peak_bytes": memory.peak,
                "before_bytes": memory.before, "peak_bytes_by_side": memory.peak_by_group,
                "rles": [a["segmentation"] for a in answer.annotations],
                "areas": [int(a["area"]) for a in answer.annotations],
            }

        image_id = client.embed(png_with_tag(image, -1)).image_id
        client.generate_masks(image_id, points_per_side=4)  # warm-up of the decoder path
        for config, params in CONFIGS.items():
            results[f"{config}/excluding_encoder"] = measured(lambda p=params: client.generate_masks(image_id, **p))
        tags = iter(range(10**6))  # new bytes of the same pixels on every call: nothing cached
        results["defaults/including_encoder"] = measured(
            lambda: client.generate_masks(png_with_tag(image, next(tags)), **CONFIGS["defaults"]))
    return results, meta.model_id


def parity(official: dict, ours: dict) -> dict:
    from tests.support.amg_reference import match

    result = match(official["rles"], ours["rles"])
    both_empty = result.official == result.ours == 0
    return {"official_masks": result.official, "our_masks": result.ours, "matched_iou_0.95": len(result.pairs),
            "count_ratio": 1.0 if both_empty else result.count_ratio,
            "matched_fraction": 1.0 if both_empty else result.matched_fraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--official-worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--include-encoder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sample-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        official_worker(args.official_worker, args.include_encoder, args.sample_memory, args.height, args.width)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    vit_b_model()  # export once, outside any timing
    ours, model_id = run_ours(args)
    official = {f"{config}/excluding_encoder": run_official(config, False, args) for config in CONFIGS}
    official["defaults/including_encoder"] = run_official("defaults", True, args)
    for key, include_encoder in (("defaults/excluding_encoder", False), ("defaults/including_encoder", True)):
        sampled = run_official("defaults", include_encoder, args, sample_memory=True)
        official[key].update(peak_bytes=sampled["peak_bytes"], before_bytes=sampled["before_bytes"])

    rows, figures = [], {}
    for key in ours:
        speedup = official[key]["seconds"] / ours[key]["seconds"]
        official_peak = official[key].get("peak_bytes")
        memory_ratio = ours[key]["peak_bytes"] / official_peak if official_peak else None
        figures[key] = {"speedup": speedup, "peak_memory_ratio": memory_ratio,
                        "parity": parity(official[key], ours[key])}
        rows.append([key, official[key]["seconds"], ours[key]["seconds"], speedup,
                     f"{official_peak / 2**20:.0f}" if official_peak else "-", f'{ours[key]["peak_bytes"] / 2**20:.0f}',
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
