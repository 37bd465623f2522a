"""GenerateMasks end to end: real gateway processes, real Triton, real Redis, real gRPC channels.

Parity is against the official ``SamAutomaticMaskGenerator`` on the same weights, twice: with the model trained
here on generated scenes (real shapes, so the stability filter and NMS decide something; the model's predicted
IoUs and stability scores run low - its masks are soft - so at the default 0.88/0.95 nothing survives and the
two thresholds are set to 0.2/0.5, everything else at the defaults), and with seeded random tiny weights at
lowered thresholds (random weights make noise masks: their stability scores are 0
and every box spans the image, so stability 0 and NMS at 1.0 let >= 50 through the predicted-IoU filter), which
exercises the bookkeeping on many masks. The filters' logic is also compared with the official code in
tests/unit/test_amg.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from samserve.client.typed_client import SamServeClient
from samserve.core.api import pb
from samserve_build import architectures, scenes
from samserve_build.settings import SCENES_CHECKPOINT
from samserve_dev.amg_reference import match
from samserve_dev.images import new_image, png_bytes, synthetic_image
from samserve_dev.metrics import sample, scrape
from samserve_dev.polling import wait_until, wait_until_stable
from samserve_dev.triton_stats import decoder_count, encoder_count

HW = (240, 320)
LOWERED = dict(points_per_side=16, pred_iou_thresh=0.02, stability_score_thresh=0.0, box_nms_thresh=1.0,
               crop_nms_thresh=1.0)


@pytest.fixture(scope="module")
def official_tiny(tiny_triton):
    torch.set_num_threads(2)
    return architectures.load_sam("tiny", tiny_triton.model.checkpoint)


@pytest.mark.parametrize("extra", [{}, {"crop_n_layers": 1}, {"min_mask_region_area": 30}],
                         ids=["whole_image", "crop_layers_1", "min_region_area"])
def test_matches_official_generator(gateway, official_tiny, extra):
    image = synthetic_image(*HW, seed=11)
    params = dict(LOWERED, **extra)
    with torch.no_grad():
        expected = SamAutomaticMaskGenerator(official_tiny, output_mode="coco_rle", **params).generate(image)
    with SamServeClient(gateway.target) as client:
        got = client.generate_masks(png_bytes(image), **params)
    assert len(expected) >= 50
    result = match([e["segmentation"] for e in expected], [a["segmentation"] for a in got.annotations])
    assert abs(result.count_ratio - 1) <= 0.02, result.count_ratio
    assert result.matched_fraction >= 0.95, result.matched_fraction
    for theirs, ours, _ in result.pairs:
        a, b = expected[theirs], got.annotations[ours]
        assert a["crop_box"] == b["crop_box"] and a["point_coords"] == b["point_coords"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-2  # the served embedding is fp16
        assert abs(a["area"] - b["area"]) <= 0.05 * max(a["area"], 1)


@pytest.mark.parametrize("extra", [{}, {"crop_n_layers": 1, "min_mask_region_area": 40}],
                         ids=["whole_image", "crops_and_small_regions"])
def test_trained_model_matches_official_generator(scenes_gateway, extra):
    torch.set_num_threads(2)
    sam = architectures.load_sam("scenes", SCENES_CHECKPOINT)
    image = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + 7).image
    params = dict(points_per_side=16, pred_iou_thresh=0.2, stability_score_thresh=0.5, **extra)
    with torch.no_grad():
        expected = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params).generate(image)
    with SamServeClient(scenes_gateway.target) as client:
        got = client.generate_masks(png_bytes(image), **params)
    assert len(expected) >= 15
    result = match([e["segmentation"] for e in expected], [a["segmentation"] for a in got.annotations])
    assert abs(len(got.annotations) - len(expected)) <= max(1, round(0.05 * len(expected))), result.count_ratio
    assert result.matched_fraction >= 0.9, result.matched_fraction
    for theirs, ours, _ in result.pairs:
        assert abs(expected[theirs]["predicted_iou"] - got.annotations[ours]["predicted_iou"]) < 1e-2
        assert abs(expected[theirs]["stability_score"] - got.annotations[ours]["stability_score"]) < 2e-2


def test_no_surviving_mask_is_an_empty_answer(scenes_gateway):
    """Where the official generator crashes (torchvision's batched_nms on the empty boxes of a crop that kept no
    mask), GenerateMasks answers with no masks."""
    image = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + 7).image
    params = dict(points_per_side=8, crop_n_layers=1, pred_iou_thresh=0.8)
    sam = architectures.load_sam("scenes", SCENES_CHECKPOINT)
    with torch.no_grad(), pytest.raises(IndexError):
        SamAutomaticMaskGenerator(sam, **params).generate(image)
    with SamServeClient(scenes_gateway.target) as client:
        answer = client.generate_masks(png_bytes(image), **params)
    assert answer.annotations == [] and answer.width == image.shape[1]


def test_second_call_runs_no_encoder_even_with_crops(gateway, tiny_triton):
    data = new_image(200, 260)
    params = dict(LOWERED, points_per_side=8, crop_n_layers=1)
    with SamServeClient(gateway.target) as client:
        before = encoder_count(tiny_triton.url)
        first = client.generate_masks(data, **params)
        assert not first.cached and encoder_count(tiny_triton.url) == before + 5  # whole image + 4 crops
        second = client.generate_masks(first.image_id, **params)  # by id: every crop is cached
        third = client.generate_masks(data, **params)
        assert encoder_count(tiny_triton.url) == before + 5
        assert second.cached and third.cached
        assert client.embed(data).cached  # the whole-image crop IS the Embed embedding
    assert [a["segmentation"] for a in second.annotations] == [a["segmentation"] for a in first.annotations]


def test_crops_by_image_id_are_computed_from_the_kept_bytes(gateway, gateway_factory, tiny_triton):
    """Embed, then GenerateMasks with crops by id alone: the crops' embeddings are computed from the bytes the gateway
    kept, and the masks equal those of a call with the bytes on another gateway (no Redis: nothing shared)."""
    data = new_image(200, 260)
    params = dict(LOWERED, points_per_side=8, crop_n_layers=1)
    with SamServeClient(gateway.target) as client:
        image_id = client.embed(data).image_id
        before = encoder_count(tiny_triton.url)
        by_id = client.generate_masks(image_id, **params)
    assert not by_id.cached and encoder_count(tiny_triton.url) == before + 4  # the 4 crops; the whole image was cached
    with SamServeClient(gateway_factory(tiny_triton.url, None).target) as client:
        with_bytes = client.generate_masks(data, **params)
    assert len(by_id.annotations) == len(with_bytes.annotations) > 0
    for ours, theirs in zip(by_id.annotations, with_bytes.annotations, strict=True):
        assert ours["segmentation"] == theirs["segmentation"] and ours["crop_box"] == theirs["crop_box"]
        assert ours["predicted_iou"] == pytest.approx(theirs["predicted_iou"], abs=1e-6)


@pytest.mark.parametrize("request_fields", [
    dict(points_per_side=0),
    dict(pred_iou_thresh=1.5),
    dict(stability_score_thresh=-0.1),
    dict(box_nms_thresh=2.0),
    dict(crop_n_layers=-1),
    dict(crop_n_layers=4),
    dict(points_per_batch=0),
    dict(points_per_side=1000),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_bad_parameters_are_invalid_argument(gateway, request_fields):
    request = pb.GenerateMasksRequest(image_bytes=new_image(), **request_fields)
    with SamServeClient(gateway.target) as client, pytest.raises(grpc.RpcError) as error:
        client.stub.GenerateMasks(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(request_fields)) in error.value.details()


def test_bad_point_grids_and_unknown_image_id(gateway):
    data = new_image()
    with SamServeClient(gateway.target) as client:
        cases = {
            "outside": ([np.array([[0.5, 0.5], [1.2, 0.3]])], {}),
            "crop_n_layers + 1": ([np.array([[0.5, 0.5]])], {"crop_n_layers": 1}),
            "exactly one": ([np.array([[0.5, 0.5]])], {"points_per_side": 4}),
        }
        for words, (grids, extra) in cases.items():
            with pytest.raises(grpc.RpcError) as error:
                client.generate_masks(data, point_grids=grids, **extra)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details(), words
        with pytest.raises(grpc.RpcError) as error:
            client.generate_masks("0" * 64)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        # An explicit grid is the official `point_grids`: one mask record per surviving (point, token).
        got = client.generate_masks(data, point_grids=[np.array([[0.25, 0.5], [0.75, 0.5]])], pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, box_nms_thresh=1.0)
        assert len(got.annotations) == 6
        assert {tuple(a["point_coords"][0]) for a in got.annotations} == {(40.0, 60.0), (120.0, 60.0)}


def test_client_deadline_stops_the_work(gateway, tiny_triton):
    """A deadline that passes mid-run ends the call AND its decoder calls: once the gateway has ended the call,
    Triton counts at most the calls already sent (``generate_decoder_calls_in_flight``), far from the full run."""
    data = new_image()
    params = dict(LOWERED, points_per_side=64, points_per_batch=4)  # 1024 decoder calls, seconds of work
    full, in_flight = 64 * 64 // 4, 3
    with SamServeClient(gateway.target) as client:
        client.embed(data)  # the encoder is not what the deadline cuts
        before = decoder_count(tiny_triton.url)
        with pytest.raises(grpc.RpcError) as error:
            client.generate_masks(data, timeout_s=0.5, **params)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: sample(scrape(gateway.metrics_url), "samserve_inflight_requests", method="GenerateMasks"),
                   lambda inflight: inflight == 0, "GenerateMasks in flight after its deadline")
        ended = decoder_count(tiny_triton.url)
        settled = wait_until_stable(lambda: decoder_count(tiny_triton.url), "decoder calls went on")
        assert settled - ended <= in_flight, (ended - before, settled - before)
        assert settled - before < full
        # and the gateway still serves
        assert client.generate_masks(data, points_per_side=4).image_id


def test_three_crop_layers_encode_every_crop_once_without_overflowing_the_encode_queue(gateway_factory, tiny_triton):
    """crop_n_layers=3 is 1 + 4 + 16 + 64 = 85 crops; they must not all queue for the encoder at once."""
    gateway = gateway_factory(tiny_triton.url, None, max_queued_encodes=4)
    data = new_image(160, 200)
    before = encoder_count(tiny_triton.url)
    with SamServeClient(gateway.target) as client:
        response = client.stub.GenerateMasks(pb.GenerateMasksRequest(
            image_bytes=data, points_per_side=2, crop_n_layers=3, pred_iou_thresh=0.0, stability_score_thresh=0.0))
    assert response.crops == 85 and response.points == 85 * 4
    assert encoder_count(tiny_triton.url) == before + 85


def test_concurrent_calls_on_one_image_encode_once(gateway, tiny_triton):
    data = new_image()
    before = encoder_count(tiny_triton.url)
    with SamServeClient(gateway.target) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.generate_masks(data, **LOWERED), range(4)))
    assert encoder_count(tiny_triton.url) == before + 1
    assert len({len(a.annotations) for a in answers}) == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samserve.cli.main", "generate-masks", *args], capture_output=True,
                          text=True, timeout=300)


def test_bulk_job_finishes_the_rest_reports_the_corrupt_file_and_resumes(gateway, tiny_triton, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "masks"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png"]
    for k, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(synthetic_image(90 + 10 * k, 120, seed=500 + k)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    options = ["--out", str(out), "--target", gateway.target, "--points-per-side", "8", "--concurrency", "3",
               "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1"]

    first = run_cli(str(folder), *options)
    assert first.returncode == 1, first.stderr
    assert "3 written, 0 already done, 1 failed" in first.stdout
    assert "FAILED broken.png: INVALID_ARGUMENT" in first.stdout
    for k, name in enumerate(names):
        document = json.loads((out / (name + ".json")).read_text())
        assert document["image"]["file_name"] == name and document["image"]["height"] == 90 + 10 * k
        assert len(document["annotations"]) == 8 * 8 * 3  # nothing filtered with these parameters
        first_mask = document["annotations"][0]
        assert set(first_mask) == {"id", "segmentation", "area", "bbox", "predicted_iou", "point_coords",
                                   "stability_score", "crop_box"}
    failures = json.loads((out / "failures.json").read_text())
    assert [f["file"] for f in failures] == ["broken.png"]

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png.json")}
    decoder_calls = decoder_count(tiny_triton.url)
    again = run_cli(str(folder), *options)
    assert "0 written, 3 already done, 0 failed, 1 skipped" in again.stdout and again.returncode == 1
    assert decoder_count(tiny_triton.url) == decoder_calls  # nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png.json")} == written

    # A list file works the same way; a missing file is a recorded failure, not a crash.
    listing = tmp_path / "list.txt"
    listing.write_text("images/a.png\n# a comment\nimages/missing.png\n")
    listed = run_cli(str(listing), "--out", str(tmp_path / "listed"), *options[2:])
    assert "1 written" in listed.stdout and "FAILED images/missing.png: READ_ERROR" in listed.stdout
    assert (tmp_path / "listed" / "images" / "a.png.json").exists()
