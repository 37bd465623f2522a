"""Train a small SAM on generated scenes with SAM's recipe (paper section 3 and appendix A).

* Loss: focal + dice at 20:1 on the mask logits (upsampled to the input resolution), plus MSE between the IoU
  head's prediction and the true IoU of each predicted mask.
* A single point is ambiguous: the decoder's 3 multimask outputs are all scored and only the lowest loss counts.
  Boxes and multi-point prompts use the single-mask output (token 0).
* Interactive rounds: each later round adds a point sampled from the error region of the previous mask
  (foreground where the mask missed, background where it spilled over) and feeds the previous low-res logits back
  as the mask prompt.
* Prompts mix single points (sampled uniformly from the object) and boxes (the tight box with noise).

Prompts are embedded exactly as the official ``PromptEncoder`` embeds them for ``SamPredictor`` (a point prompt
ends with one padding token; a box is two corner tokens; extra points come before the box corners), so the model is
trained on precisely the token layouts the service sends. Tensors are PyTorch, images B x 3 x S x S float
(normalized and zero-padded as ``Sam.preprocess`` does), masks K x 1 x S x S float in {0, 1}.

Training is resumable (``state.pt`` in the run folder), shows a progress bar, and logs loss and a small held-out
evaluation as JSON lines to ``train_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from tqdm import tqdm

from samserve.core import model_spec
from samserve_build import architectures, clicks, evaluation, prompt_embedding, scenes

LOG = logging.getLogger(__name__)

SCENES_ARCHITECTURE = architectures.ARCHITECTURES["scenes"]
"""The architecture of the shipped model."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    budget_minutes: float = 86.0
    """Training ends after ``steps`` or this much training time, whichever comes first; the learning-rate schedule
    follows whichever is further along, so a slower machine still ends with an annealed model."""
    images_per_step: int = 4
    prompts_per_image: int = 8
    rounds: int = 3
    """Prompt rounds per object: the first prompt, then points from the error region with the mask fed back."""
    learning_rate: float = 8e-4
    warmup_steps: int = 150
    weight_decay: float = 0.05
    box_fraction: float = 0.5
    whole_fraction: float = 0.25
    """Chance that an object with nested parts is trained as its whole (object plus parts) rather than its
    visible region: a point on a part is then ambiguous between the two."""
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_scenes: int = 24
    checkpoint_every: int = 50
    threads: int = 2
    init_from: str = ""
    """Start from the weights of another run's ``state.pt`` (a second training stage); its training time counts
    towards the recorded total (``previous_minutes``)."""
    previous_minutes: float = 0.0
    architecture: dict[str, Any] = dataclasses.field(default_factory=SCENES_ARCHITECTURE.to_dict)


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    """B x 3 x S x S float32, normalized, zero padding at the bottom/right."""
    masks: list[torch.Tensor]
    """Per image, K x S x S float32 in {0, 1} in resized-and-padded input coordinates."""
    is_box: list[torch.Tensor]
    """Per image, K bool: the first prompt is the object's box (else one point)."""


def encoder_input_tensor(sam: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """H x W x 3 uint8 -> (1 x 3 x S x S normalized and padded, resized (h, w)) the way ``SamPredictor`` does."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image)
    tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    return sam.preprocess(tensor), resized.shape[:2]


def resize_mask(mask: np.ndarray, resized_hw: tuple[int, int], size: int) -> np.ndarray:
    """H x W bool -> S x S float32 {0,1}: area-resized to the resized image, thresholded at 0.5, zero-padded."""
    h, w = resized_hw
    small = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) >= 0.5
    out = np.zeros((size, size), np.float32)
    out[:h, :w] = small
    return out


def training_batch(sam: Sam, config: TrainConfig, rng: np.random.Generator) -> Batch:
    size = sam.image_encoder.img_size
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    is_box: list[torch.Tensor] = []
    while len(images) < config.images_per_step:
        scene = scenes.generate_scene(int(rng.integers(0, scenes.EVAL_SEED_OFFSET)))
        if not scene.instances:
            continue
        tensor, resized_hw = encoder_input_tensor(sam, scene.image)
        targets = []
        for index in rng.choice(len(scene.instances), size=config.prompts_per_image,
                                replace=len(scene.instances) < config.prompts_per_image):
            instance = scene.instances[int(index)]
            nested = not np.array_equal(instance.whole, instance.mask)
            chosen = instance.whole if nested and rng.random() < config.whole_fraction else instance.mask
            target = resize_mask(chosen, resized_hw, size)
            if target.sum() >= 4:
                targets.append(target)
        if not targets:
            continue
        images.append(tensor)
        masks.append(torch.from_numpy(np.stack(targets)))
        is_box.append(torch.from_numpy(rng.random(len(targets)) < config.box_fraction))
    return Batch(torch.cat(images), masks, is_box)


def decode(sam: Sam, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
           mask_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's prompts -> (K x 4 x 4h x 4w low-res logits of all mask tokens, K x 4 predicted IoU).

    ``embedding`` is 1 x C x h x w; ``mask_input`` K x 1 x 4h x 4w logits or None."""
    sparse = prompt_embedding.embed_point_tokens(sam.prompt_encoder, coords, labels)
    if mask_input is None:
        h, w = sam.prompt_encoder.image_embedding_size
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(coords.shape[0], -1, h, w)
    else:
        dense = sam.prompt_encoder.mask_downscaling(mask_input)
    return sam.mask_decoder.predict_masks(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
    )


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss (mean over pixels) of ... x S x S logits against {0,1} targets."""
    probability = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits).flatten(-2)
    target = target.flatten(-2)
    return 1 - (2 * (probability * target).sum(-1) + 1) / (probability.sum(-1) + target.sum(-1) + 1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    predicted = (logits > 0).flatten(-2).float()
    target = target.flatten(-2)
    intersection = (predicted * target).sum(-1)
    union = predicted.sum(-1) + target.sum(-1) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def first_prompts(masks: torch.Tensor, is_box: torch.Tensor, rng: np.random.Generator, box_noise: float = 0.1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """K x S x S targets -> (K x 2 x 2 coords, K x 2 labels): a uniform point + padding token, or a noisy box."""
    coords = torch.zeros(masks.shape[0], 2, 2)
    labels = torch.full((masks.shape[0], 2), float(model_spec.LABEL_PADDING))
    for k, mask in enumerate(masks.numpy()):
        ys, xs = np.nonzero(mask)
        if is_box[k]:
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            noise = rng.normal(0, box_noise, size=4) * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
            box = np.array([x0, y0, x1, y1], np.float32) + np.clip(noise, -5, 5)
            coords[k] = torch.from_numpy(box.reshape(2, 2))
            labels[k] = torch.tensor([float(model_spec.LABEL_BOX_TOP_LEFT), float(model_spec.LABEL_BOX_BOTTOM_RIGHT)])
        else:
            pick = int(rng.integers(len(ys)))
            coords[k, 0] = torch.tensor([float(xs[pick]), float(ys[pick])])
            labels[k, 0] = float(model_spec.LABEL_FOREGROUND)
    return coords, labels


def insert_point(coords: torch.Tensor, labels: torch.Tensor, point: tuple[float, float, float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one click to a prompt of 1 x T tokens the way ``SamPredictor`` lays tokens out: clicks first, then the
    padding token (point prompts) or the two box corners (box prompts)."""
    x, y, label = point
    click_count = int(((labels[0] == model_spec.LABEL_BACKGROUND) | (labels[0] == model_spec.LABEL_FOREGROUND)).sum())
    new_coords = torch.cat([coords[:, :click_count], torch.tensor([[[x, y]]]), coords[:, click_count:]], dim=1)
    new_labels = torch.cat([labels[:, :click_count], torch.tensor([[label]]), labels[:, click_count:]], dim=1)
    return new_coords, new_labels


def training_loss(sam: Sam, batch: Batch, config: TrainConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    size = sam.image_encoder.img_size
    embeddings = sam.image_encoder(batch.images)
    totals = {"mask": torch.zeros(()), "iou": torch.zeros(())}
    count = 0
    for i in range(embeddings.shape[0]):
        targets = batch.masks[i][:, None]                                  # K x 1 x S x S
        coords, labels = first_prompts(batch.masks[i], batch.is_box[i], rng)
        mask_input = None
        for round_index in range(config.rounds):
            low_res, iou_pred = decode(sam, embeddings[i:i + 1], coords, labels, mask_input)
            logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
            if round_index == 0:
                # A lone point: all 3 multimask outputs are scored, the best one counts. Boxes: token 0.
                single_point = ~batch.is_box[i]
                per_pixel = single_point[:, None, None, None]
                candidates = torch.where(per_pixel, logits[:, 1:], logits[:, :1].expand(-1, 3, -1, -1))
                iou_candidates = torch.where(single_point[:, None], iou_pred[:, 1:], iou_pred[:, :1].expand(-1, 3))
                low_candidates = torch.where(per_pixel, low_res[:, 1:], low_res[:, :1].expand(-1, 3, -1, -1))
            else:
                candidates, iou_candidates, low_candidates = logits[:, :1], iou_pred[:, :1], low_res[:, :1]
            expanded = targets.expand_as(candidates)
            per_mask = (config.focal_weight * focal_loss(candidates, expanded)
                        + config.dice_weight * dice_loss(candidates, expanded))
            best = per_mask.argmin(dim=1)
            rows = torch.arange(candidates.shape[0])
            true_iou = mask_iou(candidates, expanded).detach()
            totals["mask"] = totals["mask"] + per_mask[rows, best].sum()
            totals["iou"] = totals["iou"] + ((iou_candidates - true_iou) ** 2).mean(dim=1).sum()
            count += candidates.shape[0]
            if round_index + 1 == config.rounds:
                break
            chosen = candidates[rows, best].detach()
            mask_input = low_candidates[rows, best][:, None].detach()
            next_coords, next_labels = [], []
            for k in range(chosen.shape[0]):
                point = clicks.error_point((chosen[k] > 0).numpy(), targets[k, 0].numpy() > 0.5,
                                    rng if rng.random() < 0.5 else None)
                c, lab = insert_point(coords[k:k + 1], labels[k:k + 1], point)
                next_coords.append(c)
                next_labels.append(lab)
            coords, labels = torch.cat(next_coords), torch.cat(next_labels)
    losses = {name: value / count for name, value in totals.items()}
    losses["total"] = losses["mask"] + config.iou_weight * losses["iou"]
    return losses


def training_progress(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """0..1: how far training is, by steps or by time, whichever is further."""
    return min(max(step / config.steps, elapsed_s / (60 * config.budget_minutes)), 1.0)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 2 % over the rest of ``progress``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return config.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def new_model(config: TrainConfig) -> Sam:
    torch.manual_seed(config.seed)
    sam = architectures.build_sam(architectures.SamArchitecture.from_dict(config.architecture))
    return sam.train()


def train(run_dir: Path, config: TrainConfig, max_minutes: float | None = None) -> Path:
    """Train (or resume) in ``run_dir``; returns the final checkpoint ``model.pth`` (Meta's state-dict format)
    with ``model.json`` (architecture) beside it. ``max_minutes`` stops early (resumable) after that long."""
    torch.set_num_threads(config.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    log_path = run_dir / "train_log.jsonl"
    sam = new_model(config)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(config.seed)
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["config"] != dataclasses.asdict(config):
            raise SystemExit(f"{state_path} was trained with another configuration: {state['config']}")
        sam.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        LOG.info("resuming at step %d (%.1f min trained)", step, elapsed / 60)
    elif config.init_from:
        sam.load_state_dict(torch.load(config.init_from, map_location="cpu", weights_only=False)["model"])
        LOG.info("starting from the weights in %s (%.1f min trained before)", config.init_from, config.previous_minutes)
    started = time.monotonic() - elapsed
    session_start = time.monotonic()

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": dataclasses.asdict(config), "model": sam.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step, "elapsed_s": time.monotonic() - started,
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(state_path)

    progress = tqdm(total=config.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    running: dict[str, float] = {}
    with log_path.open("a") as log:
        while training_progress(config, step, time.monotonic() - started) < 1.0:
            if max_minutes is not None and time.monotonic() - session_start > 60 * max_minutes:
                break
            rate = learning_rate(config, step, training_progress(config, step, time.monotonic() - started))
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = training_batch(sam, config, rng)
            losses = training_loss(sam, batch, config, rng)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
            optimizer.step()
            step += 1
            for name, value in losses.items():
                running[name] = 0.95 * running.get(name, float(value.detach())) + 0.05 * float(value.detach())
            progress.update(1)
            progress.set_postfix(loss=f"{running['total']:.4f}", iou=f"{running['iou']:.4f}")
            record: dict[str, Any] = {"step": step, "elapsed_s": round(time.monotonic() - started, 1),
                                      "lr": rate,
                                      **{f"loss_{k}": round(float(v.detach()), 5) for k, v in losses.items()}}
            if step % config.eval_every == 0:
                sam.eval()
                record["eval"] = evaluation.evaluate_torch(
                    sam, range(config.eval_scenes), seed_offset=scenes.EVAL_SEED_OFFSET // 2, interactive=False,
                ).summary()
                sam.train()
                LOG.info("step %d: %s", step, record["eval"])
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % config.checkpoint_every == 0:
                save_state()
    progress.close()
    save_state()
    if training_progress(config, step, time.monotonic() - started) < 1.0:
        LOG.info("stopped at step %d of %d; run again to resume", step, config.steps)
    return write_checkpoint(sam, config, run_dir, step, time.monotonic() - started)


def write_checkpoint(sam: Sam, config: TrainConfig, run_dir: Path, step: int, elapsed_s: float) -> Path:
    """``model.pth`` (state dict, Meta's key names), ``model.json`` (architecture), ``training.json`` (record)."""
    path = run_dir / "model.pth"
    torch.save({name: tensor.detach().clone() for name, tensor in sam.state_dict().items()}, path)
    path.with_suffix(architectures.ARCHITECTURE_SUFFIX).write_text(json.dumps(config.architecture, indent=2) + "\n")
    (run_dir / "training.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "steps_done": step, "train_minutes": round(elapsed_s / 60, 1),
         "total_train_minutes": round(config.previous_minutes + elapsed_s / 60, 1),
         "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2) + "\n")
    return path
