"""End-to-end mask quality of the shipped model (trained on generated scenes) through the whole service.

Gateway -> Triton (encoder, decoder) -> post-processing -> COCO RLE decoded by pycocotools, on held-out scenes,
must measure the same mIoU as the official ``SamPredictor`` running the same checkpoint in PyTorch. The
parametrized negative test breaks one link (coordinates, threshold) and shows the comparison would catch it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samserve.client.typed_client import SamServeClient
from samserve.core import model_spec
from samserve_build import architectures, evaluation, scenes
from samserve_build.settings import SCENES_CHECKPOINT
from samserve_dev.served_models import ExportedModel, serve

SCENES = range(50)
TOLERANCE = 0.01
MODEL_CARD = SCENES_CHECKPOINT.parent / "MODEL_CARD.md"
DEMO_SCENE = SCENES_CHECKPOINT.parent / "demo_scene.png"
DEMO_SEED = scenes.EVAL_SEED_OFFSET + 100_046
"""The demo scene is held out: generated from this seed, never drawn in training, not among the evaluated scenes."""
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def reference() -> evaluation.QualityReport:
    """The PyTorch evaluation (official predictor) of the shipped checkpoint on the same scenes."""
    sam = architectures.load_sam("scenes", SCENES_CHECKPOINT)
    return evaluation.evaluate_torch(sam, SCENES)


def service_report(gateway_target: str, segmenter_type: type = evaluation.ServiceSegmenter) -> evaluation.QualityReport:
    with SamServeClient(gateway_target) as client:
        return evaluation.evaluate(segmenter_type(client), SCENES)


def disagreement(reference: evaluation.QualityReport, measured: evaluation.QualityReport) -> dict[str, float]:
    """Per metric: the mIoU difference, and the 95th percentile of the per-object IoU differences (a wrong link
    can move many objects a little while the mean hardly moves)."""
    out = {}
    for metric in ("point_top", "box", "point_oracle", "interactive_3"):
        ours, theirs = np.asarray(getattr(measured, metric)), np.asarray(getattr(reference, metric))
        out[f"mean_{metric}"] = abs(float(ours.mean() - theirs.mean()))
        out[f"p95_{metric}"] = float(np.percentile(np.abs(ours - theirs), 95))
    return out


def test_service_quality_equals_pytorch(scenes_gateway, reference) -> None:
    measured = service_report(scenes_gateway.target)
    print("service", measured.summary(), "pytorch", reference.summary())
    assert measured.areas == reference.areas and len(reference.areas) > 100
    differences = disagreement(reference, measured)
    print("disagreement", differences)
    assert max(differences.values()) <= TOLERANCE, differences
    # and the model is worth measuring: far above what a broken stack scores (see the negative test)
    summary = reference.summary()
    assert summary["miou_point_top"] > 0.45 and summary["miou_box"] > 0.6


class SwappedXYSegmenter(evaluation.ServiceSegmenter):
    """A coordinate bug: x and y exchanged in every point and box (kept inside the image)."""

    def predict(self, points, labels, box, mask_input, multimask):  # type: ignore[no-untyped-def]
        def swap(x: float, y: float) -> tuple[float, float]:
            return min(y, self.width - 1), min(x, self.height - 1)

        points = None if points is None else [swap(x, y) for x, y in points]
        box = None if box is None else (*swap(box[0], box[1]), *swap(box[2], box[3]))
        return super().predict(points, labels, box, mask_input, multimask)


@pytest.fixture(scope="module")
def triton_thresholding_at_half(scenes_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory):
    """The same model served with a wrong mask threshold (0.5 on logits) in its metadata."""
    root = tmp_path_factory.mktemp("scenes-threshold")
    directory = root / "model"
    shutil.copytree(scenes_model.directory, directory)
    dataclasses.replace(scenes_model.metadata, mask_threshold=0.5).write(directory)
    yield from serve(dataclasses.replace(scenes_model, directory=directory), root / "served")


@pytest.mark.parametrize("broken", ["xy_swapped", "threshold_0.5"])
def test_a_broken_link_fails_the_comparison(broken: str, request, gateway_factory, reference) -> None:
    if broken == "xy_swapped":
        measured = service_report(request.getfixturevalue("scenes_gateway").target, SwappedXYSegmenter)
        drop = reference.summary()["miou_point_top"] - measured.summary()["miou_point_top"]
        assert drop > 0.2, drop
    else:
        served = request.getfixturevalue("triton_thresholding_at_half")
        measured = service_report(gateway_factory(served.url, None).target)
    differences = disagreement(reference, measured)
    print(broken, differences)
    assert max(differences.values()) > 2 * TOLERANCE, differences     # the equality test fails, clearly


def recorded_model_card() -> tuple[str, dict]:
    """(SHA-256, exported metadata) as the model card records them."""
    text = MODEL_CARD.read_text()
    sha = re.search(r"SHA-256: `([0-9a-f]{64})`", text).group(1)
    metadata = json.loads(re.search(r"```json metadata\n(.*?)```", text, re.S).group(1))
    return sha, metadata


def test_checkpoint_sha256_matches_model_card() -> None:
    sha, _ = recorded_model_card()
    assert architectures.sha256_file(SCENES_CHECKPOINT) == sha
    assert SCENES_CHECKPOINT.stat().st_size <= 25 * 2**20


def test_exporter_gives_the_recorded_metadata(scenes_model: ExportedModel) -> None:
    _, recorded = recorded_model_card()
    exported = json.loads(scenes_model.metadata.to_json())
    exported.pop("exporter_version")
    assert exported == recorded
    assert model_spec.ModelMetadata.read(Path(scenes_model.directory)) == scenes_model.metadata


def test_readme_demo_draws_the_object_under_the_prompt(scenes_gateway, tmp_path: Path) -> None:
    scene = scenes.generate_scene(DEMO_SEED)
    assert np.array_equal(np.asarray(Image.open(DEMO_SCENE).convert("RGB")), scene.image)
    commands = [line.split("#")[0] for line in README.read_text().splitlines()
                if line.startswith(".venv/bin/samserve segment build/checkpoints/demo_scene.png")]
    assert len(commands) == 2
    for command in commands:
        args = shlex.split(command)[2:]
        out = tmp_path / "overlay.png"
        args[args.index("--out") + 1] = str(out)
        done = subprocess.run([str(Path(sys.executable).parent / "samserve"), "segment", *args, "--target",
                               scenes_gateway.target], capture_output=True, text=True, timeout=60,
                              cwd=README.parent)
        assert done.returncode == 0, done.stderr
        overlay = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
        changed = (overlay != scene.image).any(axis=2)
        if "--point" in args:
            x, y = (float(v) for v in args[args.index("--point") + 1].split(",")[:2])
            target = next(i.mask for i in scene.instances if i.mask[int(y), int(x)])
        else:
            box = tuple(float(v) for v in args[args.index("--box") + 1].split(","))
            target = next(i.mask for i in scene.instances if scenes.tight_box(i.mask) == box)
        assert evaluation.iou(changed, target) > 0.6, command
