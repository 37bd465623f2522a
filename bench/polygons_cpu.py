"""Polygons (MASK_ENCODING_POLYGON) keep the mask: their IoU with it at the default tolerance (1 px), on the masks
the shipped model serves and on noisy masks.

* ``scenes``: held-out generated scenes (``--scenes``, default 20) through a real gateway and Triton on the shipped
  scenes model; per object, a click at its farthest interior point (all three multimask answers) and its tight box;
  every non-empty mask of the RLE answer, and the same prompts asked as polygons: the IoU the gateway reports per
  mask must be the one computed here.
* ``noisy``: seeded noisy masks (``polygon_figures.noisy_mask``: jagged blobs with holes, blurred noise,
  salt-and-pepper), ``--noisy`` of them.

Per mask, in this process: ``samserve.vision.polygons.mask_to_polygons`` at the default tolerance (timed), its IoU,
the IoU of its exterior rings alone (holes filled: what Label Studio's PolygonLabels gets), the tolerance it ended
at, its vertices against the traced outline's (tolerance 0) and the parts it dropped. Target: IoU >= 0.98 for every
mask (``samserve.vision.polygons.MIN_IOU``). Writes bench/results/polygons_cpu.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.amg_cpu import scenes_model
from bench.common import WORK, add_output_argument, environment, print_table, write_results
from bench.polygon_figures import MaskRecord, figures, noisy_mask
from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import pb
from samserve.vision import polygons
from samserve_build import evaluation, scenes
from samserve_dev import local_stack
from samserve_dev.images import png_bytes


def record(mask: np.ndarray) -> MaskRecord:
    started = time.perf_counter()
    answer = polygons.mask_to_polygons(mask)
    seconds = time.perf_counter() - started
    exteriors = polygons.PolygonSet([ring for ring in answer.rings if ring.role == "exterior"], 0, 0.0,
                                    *mask.shape)
    return MaskRecord(answer.iou, evaluation.iou(polygons.polygons_to_mask(exteriors, *mask.shape), mask),
                      answer.tolerance_px, answer.vertex_count(), polygons.mask_to_polygons(mask, 0).vertex_count(),
                      answer.dropped_parts, seconds)


def served(scene_count: int) -> tuple[list[MaskRecord], int]:
    """The records of the shipped model's masks, and how many of them the gateway's polygon answer reported with
    the same IoU."""
    model = scenes_model()
    records, agreeing = [], 0
    work = WORK / "polygons_cpu"
    with local_stack.serve_locally(model.directory, work) as triton, \
            local_stack.GatewayProcess(triton.grpc_url, None, work) as gateway, \
            SamServeClient(gateway.target) as client:
        for index in range(scene_count):
            scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + index)
            prompts = []
            for instance in scene.instances:
                prompts.append(PromptSpec(points=[scenes.farthest_interior_point(instance.mask)], labels=[1]))
                prompts.append(PromptSpec(box=scenes.tight_box(instance.mask), multimask_output=False))
            png = png_bytes(scene.image)
            as_masks = client.segment(png, prompts)
            as_polygons = client.segment(png, prompts, encoding=pb.MASK_ENCODING_POLYGON)
            for masks, outlines in zip(as_masks, as_polygons, strict=True):
                assert outlines.polygons is not None
                for mask, outline in zip(masks.masks, outlines.polygons, strict=True):
                    if mask.any():
                        records.append(record(mask))
                        agreeing += abs(records[-1].iou - outline.iou) < 1e-6
    return records, agreeing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20, help="held-out scenes 0..N-1")
    parser.add_argument("--noisy", type=int, default=40, help="noisy masks (seeds 0..N-1)")
    add_output_argument(parser)
    args = parser.parse_args()
    scene_records, agreeing = served(args.scenes)
    noisy_records = [record(noisy_mask(seed)) for seed in range(args.noisy)]
    cases = {name: figures(records, polygons.DEFAULT_TOLERANCE_PX, polygons.MIN_IOU)
             for name, records in (("scenes", scene_records), ("noisy", noisy_records))}
    cases["scenes"]["gateway_reported_the_same_iou"] = agreeing
    print_table("polygons at the default tolerance", [
        "masks", "n", "IoU min", "IoU median", "holes filled: min", "vertices / traced", "ms per mask"],
        [[name, c["masks"], c["iou"]["min"], c["iou"]["median"], c["exteriors_only_iou"]["min"],
          c["vertices_over_traced"], c["ms_per_mask_median"]] for name, c in cases.items()])
    write_results("polygons_cpu.json", {
        "benchmark": "bench/polygons_cpu.py",
        "environment": environment(),
        "tolerance_px": polygons.DEFAULT_TOLERANCE_PX,
        "min_iou": polygons.MIN_IOU,
        "min_area_px": polygons.DEFAULT_MIN_AREA_PX,
        "inputs": {"scenes": f"held-out scenes 0..{args.scenes - 1} of samserve_build.scenes, the shipped model "
                             "through gateway + Triton: a click per object (3 masks) and its tight box (1 mask), "
                             "non-empty masks",
                   "noisy": f"bench.polygon_figures.noisy_mask(seed) for seeds 0..{args.noisy - 1}"},
        "cases": cases,
        "targets_met": {name: case["iou_floor_met"] for name, case in cases.items()},
    }, args.out)


if __name__ == "__main__":
    main()
