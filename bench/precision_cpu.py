"""The mixed-precision graphs (``samserve_build.precision``) against the fp32 graphs, in ONNX Runtime on this CPU.

The figures of tests/integration/test_mixed_precision.py, with the same images, prompts, scenes and limits
(from samserve_build.graph_quality and tools/samserve_dev/mixed_precision.py):

* vit_b, seeded random weights (seed 0): every prompt's masks of the fp16 graphs against those of the fp32 graphs
  (44 prompts on a synthetic image: points, point pairs, boxes; masks upscaled and thresholded as the service
  does): min / median / mean IoU, prompts counted and skipped (empty in both);
* the shipped scenes model on the 500 held-out scenes of ``samserve_build.evaluation`` (one point, top-ranked of
  3; tight box): mIoU of the fp32 and the fp16 graphs, both through ONNX Runtime with the same processing, and
  the drops;
* the same two gates for the cpu-openvino-bf16 serving target (OpenVINO computing in bf16) against the fp32 graphs
  in ONNX Runtime (tests/integration/test_cpu_runtimes.py), under ``cpu_targets``;
* per graph: nodes converted, op types kept fp32 and why, casts inserted, file sizes (fp16 and bf16; ONNX
  Runtime's CPU provider cannot run bf16, so bf16 is written and counted, not measured).

ONNX Runtime's CPU provider computes most fp16 nodes in fp32 behind casts: these figures measure fp16 storage
rounding and overflow at node boundaries, not fp16 arithmetic inside kernels (see the module's docstring).
Writes bench/results/precision_cpu.json (about 3 minutes on 2 cores, the vit_b export excepted).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path

from bench.amg_cpu import scenes_model
from bench.common import WORK, add_output_argument, environment, print_table, vit_b_model, write_results
from samserve.core import model_spec
from samserve_build import cpu_choice, graph_quality, precision
from samserve_build.precision import Precision
from samserve_build.targets import SERVING_TARGETS, ServingTargetName
from samserve_dev import mixed_precision

CPU_ONNXRUNTIME, REDUCED = ServingTargetName.CPU_ONNXRUNTIME, ServingTargetName.CPU_OPENVINO_BF16
METRICS = ("miou_point_top", "miou_box")


def converted(model_dir: Path, name: str) -> tuple[Path, dict[str, object]]:
    """The export's fp32 graphs copied into a work folder with their fp16 and bf16 graphs beside them; the
    reports (file sizes, node counts) and conversion times per precision and graph."""
    shutil.rmtree(WORK / "precision_cpu" / name, ignore_errors=True)
    folder = mixed_precision.linked_export(model_dir, WORK / "precision_cpu" / name)
    record: dict[str, object] = {}
    for low in Precision:
        for graph_file in (model_spec.ENCODER_FILE, model_spec.DECODER_FILE):
            started = time.perf_counter()
            report = precision.write_mixed_precision(folder / graph_file,
                                                     folder / precision.mixed_precision_file(graph_file, low), low)
            entry = {key: value for key, value in dataclasses.asdict(report).items()
                     if key not in ("source", "destination", "precision")}
            record[f"{Path(graph_file).stem}.{low}"] = {"file": report.destination.name, **entry,
                                                        "size_ratio": round(report.destination_bytes
                                                                            / report.source_bytes, 4),
                                                        "seconds": round(time.perf_counter() - started, 2)}
    return folder, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=len(graph_quality.SCENES), help="held-out scenes 0..N-1")
    add_output_argument(parser)
    args = parser.parse_args()
    workers = os.cpu_count() or 1

    _, vit_b_dir, vit_b_meta = vit_b_model()
    vit_b_folder, vit_b_graphs = converted(vit_b_dir, "vit_b")
    images, prompts = mixed_precision.vit_b_inputs()
    started = time.perf_counter()
    agreement = graph_quality.mask_agreement(graph_quality.OnnxSam.of_model(vit_b_folder),
                                         graph_quality.OnnxSam.of_model(vit_b_folder, Precision.FP16), images, prompts)
    vit_b = {**agreement.summary(), "seconds": round(time.perf_counter() - started, 1)}
    vit_b["met"] = agreement_met(vit_b)
    shutil.rmtree(vit_b_folder)   # 0.9 GB of graphs
    started = time.perf_counter()
    agreement = graph_quality.mask_agreement(graph_quality.OnnxSam.of_target(vit_b_dir, CPU_ONNXRUNTIME),
                                             graph_quality.OnnxSam.of_target(vit_b_dir, REDUCED), images, prompts)
    reduced_vit_b = {**agreement.summary(), "seconds": round(time.perf_counter() - started, 1)}
    reduced_vit_b["met"] = agreement_met(reduced_vit_b)

    scenes = scenes_model()
    scenes_folder, scenes_graphs = converted(scenes.directory, "scenes")
    started = time.perf_counter()
    results = graph_quality.scenes_quality(
        {"fp32": graph_quality.OnnxSam.of_model(scenes_folder, intra_op_threads=1),
         "fp16": graph_quality.OnnxSam.of_model(scenes_folder, Precision.FP16, intra_op_threads=1),
         REDUCED: graph_quality.OnnxSam.of_target(scenes.directory, REDUCED, threads=1)},
        range(args.scenes), workers=workers)
    fp32, fp16 = results["fp32"].summary(), results["fp16"].summary()
    drops = {metric: round(fp32[metric] - fp16[metric], 5) for metric in METRICS}
    scenes_record = {"scenes": args.scenes, "fp32": fp32, "fp16": fp16, "drop": drops,
                     "met": all(drop <= graph_quality.MIOU_DROP_LIMIT for drop in drops.values()),
                     "seconds": round(time.perf_counter() - started, 1), "workers": workers,
                     "intra_op_threads": 1}
    reduced = results[REDUCED].summary()
    reduced_drops = {metric: round(fp32[metric] - reduced[metric], 5) for metric in METRICS}
    reduced_scenes = {"scenes": args.scenes, "fp32": fp32, REDUCED: reduced, "drop": reduced_drops,
                      "met": all(drop <= graph_quality.MIOU_DROP_LIMIT for drop in reduced_drops.values())}
    cpu = cpu_choice.Cpu.detect()

    print_table("vit_b (seeded random weights): fp16 masks vs fp32 masks, IoU per prompt",
                ["prompts", "skipped", "min", "median", "mean", "met"],
                [[vit_b["prompts"], vit_b["skipped_both_empty"], f"{vit_b['min_iou']:.4f}",
                  f"{vit_b['median_iou']:.4f}", f"{vit_b['mean_iou']:.4f}", vit_b["met"]]])
    print_table(f"vit_b (seeded random weights): {REDUCED} masks vs fp32 (ONNX Runtime) masks, IoU per prompt",
                ["prompts", "skipped", "min", "median", "mean", "met"],
                [[reduced_vit_b["prompts"], reduced_vit_b["skipped_both_empty"], f"{reduced_vit_b['min_iou']:.4f}",
                  f"{reduced_vit_b['median_iou']:.4f}", f"{reduced_vit_b['mean_iou']:.4f}", reduced_vit_b["met"]]])
    print_table(f"scenes model, {args.scenes} held-out scenes: mIoU",
                ["metric", "fp32", "fp16", "drop", REDUCED, "drop"],
                [[metric, f"{fp32[metric]:.4f}", f"{fp16[metric]:.4f}", f"{drop:+.5f}", f"{reduced[metric]:.4f}",
                  f"{reduced_drops[metric]:+.5f}"] for metric, drop in drops.items()])
    print_table("graphs", ["model", "graph", "nodes converted", "fp32 kept", "casts", "MiB", "size ratio"],
                [[model, name, g["converted_nodes"], sum(g["kept_fp32_op_types"].values()), g["casts_inserted"],
                  f"{g['destination_bytes'] / 2**20:.1f}", f"{g['size_ratio']:.3f}"]
                 for model, graphs in (("vit_b", vit_b_graphs), ("scenes", scenes_graphs))
                 for name, g in graphs.items()])
    write_results("precision_cpu.json", {
        "benchmark": "bench/precision_cpu.py",
        "environment": environment(),
        "what": "mixed-precision (fp16) ONNX graphs vs their fp32 graphs, ONNX Runtime CPU provider, the figures "
                "and limits of tests/integration/test_mixed_precision.py",
        "caveat": "ONNX Runtime's CPU provider computes most fp16 nodes in fp32 behind casts: fp16 storage rounding "
                  "and overflow at node boundaries are measured, not fp16 arithmetic inside kernels; bf16 graphs are "
                  "written (counted below) but cannot run on the CPU provider",
        "limits": {"min_iou": graph_quality.MIN_IOU, "median_iou": graph_quality.MEDIAN_IOU,
                   "min_prompts": graph_quality.MIN_PROMPTS, "miou_drop": graph_quality.MIOU_DROP_LIMIT},
        "vit_b_random": {"model_id": vit_b_meta.model_id,
                         "images": [list(image) for image in mixed_precision.VIT_B_IMAGES], **vit_b},
        "scenes": {"model_id": scenes.model_id, "weights": scenes.weights, **scenes_record},
        "graphs": {"vit_b": vit_b_graphs, "scenes": scenes_graphs},
        "cpu_targets": {REDUCED: {
            "what": f"the {REDUCED} serving target (OpenVINO computing in bf16) against the fp32 graphs in ONNX "
                    "Runtime, the gates of tests/integration/test_cpu_runtimes.py",
            "native_bf16": bool(set(SERVING_TARGETS[REDUCED].native_flags) & set(cpu.flags)),
            "vit_b_random": reduced_vit_b, "scenes": reduced_scenes}},
    }, args.out)


def agreement_met(summary: dict[str, float | int]) -> bool:
    return bool(summary["prompts"] >= graph_quality.MIN_PROMPTS and summary["min_iou"] >= graph_quality.MIN_IOU
                and summary["median_iou"] >= graph_quality.MEDIAN_IOU)


if __name__ == "__main__":
    main()
