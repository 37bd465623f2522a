"""The training recipe's pieces (against the official modules) and the evaluation's rules; the scene generator's
tests are in tests/unit/test_scenes.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samserve_build import architectures, clicks, evaluation, prompt_embedding, scenes, training


@pytest.fixture(scope="module")
def tiny_sam():
    return architectures.build_sam(architectures.ARCHITECTURES["tiny"]).eval()


def test_prompt_embedding_equals_the_official_prompt_encoder(tiny_sam) -> None:
    encoder = tiny_sam.prompt_encoder
    torch.manual_seed(0)
    for weight in (encoder.not_a_point_embed.weight, *(e.weight for e in encoder.point_embeddings)):
        weight.data.normal_()
    point = torch.tensor([[[30.0, 40.0]]])
    with torch.no_grad():
        official, _ = encoder(points=(point, torch.tensor([[1]])), boxes=None, masks=None)   # point + padding token
        point_and_padding = torch.tensor([[[30.0, 40.0], [0.0, 0.0]]])
        ours = prompt_embedding.embed_point_tokens(encoder, point_and_padding, torch.tensor([[1.0, -1.0]]))
        assert torch.allclose(ours, official, atol=1e-6)
        box = torch.tensor([[10.0, 20.0, 90.0, 70.0]])
        clicks = torch.tensor([[[50.0, 50.0], [12.0, 22.0]]])
        official, _ = encoder(points=(clicks, torch.tensor([[1, 0]])), boxes=box, masks=None)
        coords, labels = torch.tensor([[[10.0, 20.0], [90.0, 70.0]]]), torch.tensor([[2.0, 3.0]])
        for x, y, label in ((50.0, 50.0, 1.0), (12.0, 22.0, 0.0)):
            coords, labels = training.insert_point(coords, labels, (x, y, label))
        assert labels.tolist() == [[1.0, 0.0, 2.0, 3.0]]
        assert torch.allclose(prompt_embedding.embed_point_tokens(encoder, coords, labels), official, atol=1e-6)


def test_decode_equals_the_official_predictor(tiny_sam) -> None:
    image = scenes.generate_scene(3, size=(200, 256)).image
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    _, scores, low_res = predictor.predict(point_coords=np.array([[100.0, 60.0]]), point_labels=np.array([1]))
    with torch.no_grad():
        tensor, _ = training.encoder_input_tensor(tiny_sam, image)
        embedding = tiny_sam.image_encoder(tensor)
        coords = torch.tensor([[[100.0, 60.0], [0.0, 0.0]]])     # 200 x 256 needs no resize at 256 px
        ours_low, ours_iou = training.decode(tiny_sam, embedding, coords, torch.tensor([[1.0, -1.0]]), None)
    assert np.allclose(ours_low[0, 1:].numpy(), low_res, atol=1e-4)
    assert np.allclose(ours_iou[0, 1:].numpy(), scores, atol=1e-5)


def test_first_prompts_point_inside_the_object_and_box_around_it() -> None:
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:20, 4:30] = 1
    coords, labels = training.first_prompts(masks, torch.tensor([False, True]), np.random.default_rng(1), box_noise=0.0)
    x, y = coords[0, 0].int().tolist()
    assert masks[0, y, x] == 1 and labels[0].tolist() == [1.0, -1.0]
    assert coords[1].flatten().tolist() == [4.0, 8.0, 29.0, 19.0] and labels[1].tolist() == [2.0, 3.0]


def test_losses_reward_the_right_mask_and_the_iou_is_exact() -> None:
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    right, wrong = (target * 2 - 1) * 20, (1 - target * 2) * 20
    assert training.focal_loss(right, target).item() < 1e-6 < training.focal_loss(wrong, target).item()
    assert training.dice_loss(right, target).item() < 0.01 and training.dice_loss(wrong, target).item() > 0.99
    half = target.clone()
    half[..., 4:8, :] = 0
    assert training.mask_iou(half * 2 - 1, target).item() == pytest.approx(0.5)


def test_error_point_clicks_the_centre_of_the_largest_error() -> None:
    target = np.zeros((30, 30), bool)
    target[5:25, 5:25] = True
    predicted = target.copy()
    predicted[5:25, 5:12] = False                  # missed a 20 x 7 strip (foreground click)
    predicted[0:2, 0:2] = True                      # small spill-over
    x, y, label = clicks.error_point(predicted, target, None)
    assert label == 1.0 and 5 <= x < 12 and 5 <= y < 25 and not predicted[int(y), int(x)]
    x, y, label = clicks.error_point(target | (np.arange(30)[:, None] > 26), target, None)
    assert label == 0.0 and y > 26


def test_training_resumes_where_it_stopped(tmp_path) -> None:
    config = training.TrainConfig(steps=3, images_per_step=1, prompts_per_image=2, rounds=2, warmup_steps=1,
                                  eval_every=2, eval_scenes=1, checkpoint_every=1,
                                  architecture=architectures.ARCHITECTURES["tiny"].to_dict())
    training.train(tmp_path, dataclasses.replace(config), max_minutes=0.0)          # stops before any step
    assert not (tmp_path / "train_log.jsonl").read_text()
    training.train(tmp_path, config, max_minutes=None)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "miou_box" in log[1]["eval"]
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 3
    sam = architectures.load_sam("custom", tmp_path / "model.pth")    # Meta's format + architecture JSON
    assert isinstance(sam, torch.nn.Module)
    with pytest.raises(SystemExit):
        training.train(tmp_path, dataclasses.replace(config, learning_rate=1.0))


class GroundTruthSegmenter:
    """Answers every prompt with the mask of the object under the first point or inside the box."""

    def set_image(self, image: np.ndarray) -> None:
        self.scene = next(s for s in (scenes.generate_scene(scenes.EVAL_SEED_OFFSET + i) for i in range(3))
                          if np.array_equal(s.image, image))

    def predict(self, points, labels, box, mask_input, multimask):  # type: ignore[no-untyped-def]
        for instance in self.scene.instances:
            if (box is not None and scenes.tight_box(instance.mask) == tuple(box)) or (
                    points is not None and instance.mask[int(points[0][1]), int(points[0][0])]):
                count = 3 if multimask else 1
                return (np.repeat(instance.mask[None], count, 0), np.linspace(1.0, 0.5, count),
                        np.zeros((count, 8, 8), np.float32))
        raise AssertionError("prompt outside every object")


def test_evaluation_scores_a_perfect_segmenter_one() -> None:
    summary = evaluation.evaluate(GroundTruthSegmenter(), range(3)).summary()
    assert summary["scenes"] == 3 and summary["objects"] > 3
    for metric in ("miou_point_top", "miou_point_oracle", "miou_box", "miou_interactive_3"):
        assert summary[metric] == 1.0


def test_the_shipped_model_is_served_unless_another_is_configured(monkeypatch) -> None:
    from samserve_build.settings import SCENES_CHECKPOINT
    from samserve_build.settings import BuildSettings as Settings

    for name in ("SAMSERVE_MODEL_VARIANT", "SAMSERVE_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    default = Settings()
    monkeypatch.setenv("SAMSERVE_MODEL_VARIANT", "vit_q")
    with pytest.raises(ValueError, match="unknown model variant 'vit_q'"):
        Settings()  # choices are validated when the settings are read, before anything starts
    monkeypatch.delenv("SAMSERVE_MODEL_VARIANT")
    assert (default.model_variant, default.checkpoint) == ("scenes", SCENES_CHECKPOINT)
    assert SCENES_CHECKPOINT.exists() and SCENES_CHECKPOINT.with_suffix(".json").exists()
    assert default.model_id == "scenes:samserve_scenes_v1"
    monkeypatch.setenv("SAMSERVE_MODEL_VARIANT", "vit_b")
    assert Settings().checkpoint is None                       # Meta's variant without a path: random weights
    monkeypatch.setenv("SAMSERVE_CHECKPOINT", "/models/sam_vit_b_01ec64.pth")
    assert Settings().model_id == "vit_b:sam_vit_b_01ec64"
