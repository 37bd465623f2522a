"""MASK_ENCODING_POLYGON end to end on the shipped model: a real gateway, real Triton, the typed client, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import pb
from samserve.vision import mask_encoding, polygons
from samserve_build import evaluation, scenes
from samserve_dev.images import png_bytes

SEEDS = range(scenes.EVAL_SEED_OFFSET, scenes.EVAL_SEED_OFFSET + 3)


def _scene_prompts(scene: scenes.Scene) -> list[PromptSpec]:
    """One click at the farthest interior point of each object, and one box around each."""
    prompts = []
    for instance in scene.instances:
        x, y = scenes.farthest_interior_point(instance.mask)
        prompts.append(PromptSpec(points=[(x, y)], labels=[1], multimask_output=True))
        prompts.append(PromptSpec(box=scenes.tight_box(instance.mask), multimask_output=False))
    return prompts


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_polygons_keep_the_mask(scenes_gateway, seed: int) -> None:
    """Every mask of every prompt: the polygons' reported IoU >= 0.98, equal to the IoU of the polygons rasterised
    by the client against the RLE mask of the same prompt; holes come as interior rings after their exterior."""
    scene = scenes.generate_scene(seed)
    image, prompts = png_bytes(scene.image), _scene_prompts(scene)
    with SamServeClient(scenes_gateway.target) as client:
        as_rle = client.segment(image, prompts)
        as_polygons = client.segment(image, prompts, encoding=pb.MASK_ENCODING_POLYGON)
    checked = 0
    for rle_answer, polygon_answer in zip(as_rle, as_polygons, strict=True):
        assert polygon_answer.polygons is not None and len(polygon_answer.polygons) == len(rle_answer.masks)
        np.testing.assert_array_equal(polygon_answer.predicted_iou, rle_answer.predicted_iou)
        for mask, outline, drawn in zip(rle_answer.masks, polygon_answer.polygons, polygon_answer.masks,
                                        strict=True):
            if not mask.any():
                continue
            assert outline.rings and outline.rings[0].role == "exterior"
            assert outline.iou >= polygons.MIN_IOU
            assert evaluation.iou(drawn, mask) == pytest.approx(outline.iou, abs=1e-6)
            assert outline.tolerance_px <= polygons.DEFAULT_TOLERANCE_PX
            for index, ring in enumerate(outline.rings):
                assert (ring.parent is None) == (ring.role == "exterior")
                assert ring.parent is None or outline.rings[ring.parent].role == "exterior" and ring.parent < index
            checked += 1
    assert checked >= len(prompts)


def test_tolerance_zero_is_the_traced_outline_and_a_coarse_one_is_refined(scenes_gateway) -> None:
    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET)
    image, prompts = png_bytes(scene.image), _scene_prompts(scene)[:2]
    with SamServeClient(scenes_gateway.target) as client:
        masks = client.segment(image, prompts)
        exact = client.segment(image, prompts, encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=0)
        coarse = client.segment(image, prompts, encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=50)
    for reference, traced, simplified in zip(masks, exact, coarse, strict=True):
        for mask, drawn, fine in zip(reference.masks, traced.masks, traced.polygons, strict=True):
            if fine.dropped_parts == 0:  # tolerance 0 gives the mask back, less the specks under 4 pixels
                np.testing.assert_array_equal(drawn, mask)
            else:
                assert fine.iou == pytest.approx(evaluation.iou(drawn, mask)) and fine.iou >= 0.999
        for outline, fine in zip(simplified.polygons, traced.polygons, strict=True):
            assert outline.iou >= polygons.MIN_IOU
            assert outline.vertex_count() <= fine.vertex_count()


def test_generate_masks_polygons_agree_with_its_rles(scenes_gateway) -> None:
    """GenerateMasks with polygons: one Polygons per record, in the RLE answer's order; the COCO polygons, read by
    pycocotools (what COCO tools run), cover the RLE mask. pycocotools fills a ring through the centres of the
    boundary pixels and so keeps only part of them: the agreement is lower for small masks."""
    coco_mask = pytest.importorskip("pycocotools.mask")
    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + 1)
    image = png_bytes(scene.image)
    request = dict(image_bytes=image, points_per_side=8, pred_iou_thresh=0.2, stability_score_thresh=0.5)
    with SamServeClient(scenes_gateway.target) as client:
        as_rle = client.stub.GenerateMasks(pb.GenerateMasksRequest(**request), timeout=120)
        as_polygons = client.stub.GenerateMasks(
            pb.GenerateMasksRequest(**request, mask_encoding=pb.MASK_ENCODING_POLYGON), timeout=120)
    assert len(as_rle.masks) == len(as_polygons.masks) > 0
    height, width = as_rle.height, as_rle.width
    for with_rle, with_polygons in zip(as_rle.masks, as_polygons.masks, strict=True):
        assert not with_polygons.HasField("rle") and with_polygons.area == with_rle.area
        mask = mask_encoding.decode_rle(list(with_rle.rle.size), with_rle.rle.counts)
        outline = with_polygons.polygons
        assert outline.iou >= polygons.MIN_IOU
        coco = [list(ring.points) for ring in outline.rings if ring.role == pb.RING_ROLE_EXTERIOR]
        holes = [list(ring.points) for ring in outline.rings if ring.role == pb.RING_ROLE_INTERIOR]
        drawn = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(coco, height, width))).astype(bool)
        if holes:
            drawn &= ~coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(holes, height, width))).astype(bool)
        # pycocotools' raster differs from the mask only along the outlines: at most a pixel per pixel of outline
        outline_length = sum(np.hypot(*np.diff(np.reshape(ring.points, (-1, 2)), axis=0, append=[ring.points[:2]]).T)
                             .sum() for ring in outline.rings)
        assert np.count_nonzero(drawn != mask) <= outline_length, (int(mask.sum()), outline_length)


def test_the_cli_writes_polygons_and_reports_a_bad_tolerance(scenes_gateway, tmp_path: Path) -> None:
    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + 2)
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(scene.image))
    x, y = scenes.farthest_interior_point(scene.instances[0].mask)
    samserve = str(Path(sys.executable).parent / "samserve")
    out = tmp_path / "polygons.json"
    done = subprocess.run([samserve, "segment", str(image), "--point", f"{x},{y}", "--polygon", str(out),
                           "--target", scenes_gateway.target], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    assert len(document["masks"]) == 3 and document["width"] == scene.image.shape[1]
    for mask in document["masks"]:
        assert mask["iou_with_mask"] >= polygons.MIN_IOU
        assert mask["segmentation"] == [ring["points"] for ring in mask["rings"] if ring["role"] == "exterior"]
    assert "ring(s) of" in done.stdout
    refused = subprocess.run([samserve, "segment", str(image), "--point", f"{x},{y}", "--polygon", str(out),
                              "--polygon-tolerance", "-1", "--target", scenes_gateway.target],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stderr and "polygon_tolerance_px" in refused.stderr


def test_the_bulk_job_writes_polygons(scenes_gateway, tmp_path: Path) -> None:
    """`samserve generate-masks --polygon`: each annotation's segmentation is its COCO polygons (exterior rings),
    with every ring and the IoU of the polygons with the server's mask."""
    folder = tmp_path / "images"
    folder.mkdir()
    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + 1)
    (folder / "scene.png").write_bytes(png_bytes(scene.image))
    out = tmp_path / "out"
    done = subprocess.run([str(Path(sys.executable).parent / "samserve"), "generate-masks", str(folder), "--out",
                           str(out), "--polygon", "--points-per-side", "8", "--pred-iou-thresh", "0.2",
                           "--stability-score-thresh", "0.5", "--quiet", "--target", scenes_gateway.target],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "scene.png.json").read_text())
    assert document["parameters"]["mask_encoding"] == pb.MASK_ENCODING_POLYGON and document["annotations"]
    height, width = document["image"]["height"], document["image"]["width"]
    for annotation in document["annotations"]:
        assert annotation["polygon_iou"] >= polygons.MIN_IOU
        rings = [polygons.Ring(r["points"], r["role"], r["parent"]) for r in annotation["rings"]]
        assert annotation["segmentation"] == [ring.points for ring in rings if ring.role == "exterior"]
        drawn = polygons.polygons_to_mask(polygons.PolygonSet(rings, 0, 0.0, height, width), height, width)
        assert abs(int(drawn.sum()) - annotation["area"]) <= (1 - polygons.MIN_IOU) * 2 * annotation["area"] + 4
