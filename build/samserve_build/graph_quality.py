"""Masks of exported graphs through the serving runtimes, with the service's pre- and post-processing: how far a
changed graph (a mixed-precision one, :mod:`samserve_build.precision`) or a reduced-precision runtime (OpenVINO in
bf16) moves the masks of the fp32 graph, and its mask quality on the held-out generated scenes of
:mod:`samserve_build.evaluation`. The gates of `make test` (tests/integration/test_mixed_precision.py,
tests/integration/test_cpu_runtimes.py) and the figures of bench/precision_cpu.py.

ONNX Runtime's CPU provider computes most fp16 nodes in fp32 behind casts: on the CPU this catches fp16 storage
rounding and overflow at node boundaries, not fp16 arithmetic inside a GPU kernel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from samserve.backends.python_model import OnnxRunner, Runner, create_runner
from samserve.core import model_spec
from samserve.vision import processing
from samserve_build.precision import Precision, mixed_precision_file
from samserve_build.targets import SERVING_TARGETS, ServingTargetName

SCENES = range(500)
"""The held-out scenes of the quality gate (those of the model card's table)."""
MIOU_DROP_LIMIT = 0.005
"""Largest mIoU a changed graph may lose on those scenes (point and box)."""
MIN_IOU = 0.98
MEDIAN_IOU = 0.99
"""Mask agreement with the graph it comes from: every prompt's IoU, and their median."""
MIN_PROMPTS = 30
"""Prompts with a non-empty mask that the vit_b gate needs (of 44)."""


def agreement_prompts(height: int, width: int, seed: int) -> list[processing.Prompt]:
    """44 prompts in original pixels: 24 single points on a grid and 8 foreground + background pairs (multimask),
    12 boxes (single mask)."""
    rng = np.random.default_rng(seed)
    prompts = [processing.Prompt(points=np.array([[fx * width, fy * height]]), labels=np.array([1]))
               for fy in (0.15, 0.38, 0.62, 0.85) for fx in (0.1, 0.26, 0.42, 0.58, 0.74, 0.9)]
    prompts += [processing.Prompt(points=rng.uniform(0, 1, (2, 2)) * (width, height), labels=np.array([1, 0]))
                for _ in range(8)]
    for _ in range(12):
        x0, y0 = rng.uniform(0, 0.5, 2) * (width, height)
        x1, y1 = np.minimum((x0, y0) + rng.uniform(0.2, 0.5, 2) * (width, height), (width - 1, height - 1))
        prompts.append(processing.Prompt(box=np.array([x0, y0, x1, y1]), multimask_output=False))
    return prompts


class OnnxSam:
    """An exported encoder and decoder in the runners Triton's python backend uses
    (:class:`samserve.backends.python_model.Runner`), with the service's pre- and post-processing
    (:mod:`samserve.vision.processing`): images H x W x 3 uint8 RGB, prompts in original-image pixels."""

    def __init__(self, encoder: Runner, decoder: Runner, meta: model_spec.ModelMetadata):
        self.meta = meta
        self.encoder, self.decoder = encoder, decoder

    @classmethod
    def of_model(cls, model_dir: Path, precision: Precision | None = None, intra_op_threads: int = 0) -> OnnxSam:
        """The fp32 graphs of an export folder in ONNX Runtime, or with ``precision`` its mixed-precision ones."""
        model_dir = Path(model_dir)
        encoder, decoder = model_spec.ENCODER_FILE, model_spec.DECODER_FILE
        if precision is not None:
            encoder, decoder = mixed_precision_file(encoder, precision), mixed_precision_file(decoder, precision)
        parameters = {"intra_op_threads": str(intra_op_threads)}
        return cls(OnnxRunner(model_dir / encoder, parameters), OnnxRunner(model_dir / decoder, parameters),
                   model_spec.ModelMetadata.read(model_dir))

    @classmethod
    def of_target(cls, model_dir: Path, target: ServingTargetName, threads: int = 0) -> OnnxSam:
        """An export folder's graphs as CPU serving ``target`` runs them (its configs' runtime and precision),
        ``threads`` per runner (0: the runtime's default)."""
        from samserve_build.cpu_choice import runtime_parameters

        model_dir = Path(model_dir)
        meta = model_spec.ModelMetadata.read(model_dir)
        runners: dict[str, Runner] = {}
        for model, model_file in SERVING_TARGETS[target].model_files.items():
            parameters = {**runtime_parameters(target, model), "intra_op_threads": str(threads),
                          "threads": str(threads)}
            runners[model] = create_runner(parameters.get("runtime", "onnxruntime"), model_dir / model_file, model,
                                           parameters, meta, 0)
        return cls(runners[model_spec.ENCODER_MODEL], runners[model_spec.DECODER_MODEL], meta)

    @classmethod
    def bf16_as_gated(cls, model_dir: Path, threads: int = 0) -> tuple[OnnxSam, str]:
        """``cpu-openvino-bf16`` as its mask gates judge it, on any CPU: (the graphs, how they compute). Where this
        CPU has native bf16 (the target's ``native_flags``), OpenVINO's bf16 as served ("openvino"); elsewhere
        OpenVINO would quietly compute fp32, so the encoder's bf16 arithmetic is emulated in ONNX Runtime
        (:mod:`samserve_build.precision.emulation`, "emulated"), with the fp32 decoder the target serves."""
        from samserve_build.cpu_choice import Cpu
        from samserve_build.precision import emulation

        target = ServingTargetName.CPU_OPENVINO_BF16
        if set(SERVING_TARGETS[target].native_flags) & set(Cpu.detect().flags):
            return cls.of_target(model_dir, target, threads), "openvino"
        model_dir = Path(model_dir)
        encoder = model_dir / emulation.emulation_file(model_spec.ENCODER_FILE)
        if not encoder.exists():
            emulation.write_bf16_emulation(model_dir / model_spec.ENCODER_FILE, encoder)
        parameters = {"intra_op_threads": str(threads)}
        return cls(OnnxRunner(encoder, parameters), OnnxRunner(model_dir / model_spec.DECODER_FILE, parameters),
                   model_spec.ModelMetadata.read(model_dir)), "emulated"

    def embed(self, image: np.ndarray) -> tuple[np.ndarray, processing.PreparedImage]:
        """(float32 1 x C x h x w embedding, the prepared image)."""
        prepared = processing.prepare_image(image, self.meta.image_size)
        outputs = self.encoder.run({
            model_spec.ENC_IMAGE: prepared.padded[None],
            model_spec.ENC_INPUT_SIZE: np.array([prepared.input_size], dtype=np.int64)})
        return outputs[model_spec.ENC_EMBEDDING], prepared

    def decode(self, embedding: np.ndarray, prepared: processing.PreparedImage,
               prompts: Sequence[processing.Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """All mask tokens of each prompt: (float32 N x M x 4h x 4w logits, float32 N x M predicted IoUs); one
        decoder run per token count."""
        count, tokens = len(prompts), self.meta.num_mask_tokens
        logits = np.empty((count, tokens, *self.meta.low_res_mask_size), dtype=np.float32)
        scores = np.empty((count, tokens), dtype=np.float32)
        for batch in processing.decoder_batches(prompts, prepared.original_size, prepared.input_size,
                                                self.meta.low_res_mask_size):
            outputs = self.decoder.run({
                model_spec.DEC_EMBEDDING: embedding, model_spec.DEC_POINT_COORDS: batch.point_coords,
                model_spec.DEC_POINT_LABELS: batch.point_labels, model_spec.DEC_MASK_INPUT: batch.mask_input,
                model_spec.DEC_HAS_MASK_INPUT: batch.has_mask_input})
            logits[batch.prompt_indices] = outputs[model_spec.DEC_LOW_RES_MASKS]
            scores[batch.prompt_indices] = outputs[model_spec.DEC_IOU_PREDICTIONS]
        return logits, scores

    def masks(self, logits: np.ndarray, prepared: processing.PreparedImage) -> np.ndarray:
        """K x 4h x 4w logits -> K x H x W bool masks at the original size, as the service makes them."""
        full = processing.upscale_logits(logits, prepared.input_size, prepared.original_size, self.meta.image_size)
        return processing.binarize(full, self.meta.mask_threshold)


def _iou(first: np.ndarray, second: np.ndarray) -> float | None:
    """IoU of two bool masks; None when both are empty."""
    union = int(np.count_nonzero(first | second))
    return int(np.count_nonzero(first & second)) / union if union else None


@dataclasses.dataclass(frozen=True)
class MaskAgreement:
    """IoU of the mixed graphs' masks against the fp32 graphs' masks, one value per prompt: the worst of the
    masks the prompt returns (3 with multimask output, else 1), masks empty in both left out; a prompt all of
    whose masks are empty in both is skipped (an agreement on nothing)."""

    ious: tuple[float, ...]
    skipped: int

    def summary(self) -> dict[str, float | int]:
        return {"prompts": len(self.ious), "skipped_both_empty": self.skipped,
                "min_iou": round(min(self.ious), 5), "median_iou": round(statistics.median(self.ious), 5),
                "mean_iou": round(statistics.fmean(self.ious), 5)}


def mask_agreement(reference: OnnxSam, mixed: OnnxSam, images: Sequence[np.ndarray],
                   prompts: Sequence[Sequence[processing.Prompt]]) -> MaskAgreement:
    """:class:`MaskAgreement` of ``mixed`` against ``reference`` over ``prompts[i]`` on ``images[i]``."""
    ious: list[float] = []
    skipped = 0
    for image, image_prompts in zip(images, prompts, strict=True):
        answers = []
        for graphs in (reference, mixed):
            embedding, prepared = graphs.embed(image)
            answers.append(graphs.decode(embedding, prepared, image_prompts)[0])
        for row, prompt in enumerate(image_prompts):
            chosen = processing.select_masks(prompt.multimask_output, reference.meta.num_mask_tokens)
            pairs = zip(reference.masks(answers[0][row, chosen], prepared),
                        mixed.masks(answers[1][row, chosen], prepared), strict=True)
            values = [value for value in (_iou(a, b) for a, b in pairs) if value is not None]
            if values:
                ious.append(min(values))
            else:
                skipped += 1
    return MaskAgreement(tuple(ious), skipped)


@dataclasses.dataclass
class ScenesQuality:
    """Per-object IoU against the true masks on held-out generated scenes (:mod:`samserve_build.evaluation`'s
    prompts): ``point_top`` one foreground point, multimask, the mask of the highest predicted IoU; ``box`` the
    tight box, single mask."""

    point_top: list[float] = dataclasses.field(default_factory=list)
    box: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {"objects": len(self.box), "miou_point_top": round(float(np.mean(self.point_top)), 5),
                "miou_box": round(float(np.mean(self.box)), 5)}


def scenes_quality(graphs: Mapping[str, OnnxSam], scene_indices: Iterable[int], workers: int = 1
                   ) -> dict[str, ScenesQuality]:
    """Evaluate each of ``graphs`` on the held-out scenes ``EVAL_SEED_OFFSET + i`` with the prompts of
    :func:`samserve_build.evaluation.object_prompts`: every scene is generated once, each graph pair embeds it once
    and decodes all of its prompts in one decoder run (a point prompt and a box are both 2 tokens).

    ``workers``: scenes evaluated at once, on threads sharing the sessions (ONNX Runtime runs a session from
    several threads). On a small CPU, sessions of one intra-op thread each and one worker per core are the fastest
    (measured on 2 cores with the shipped model: 2 intra-op threads make a run only 0-10 % faster)."""
    results = {name: ScenesQuality() for name in graphs}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scenes") as pool:
        for per_scene in pool.map(lambda index: _scene_ious(graphs, index), scene_indices):
            for name, (point_top, box) in per_scene.items():
                results[name].point_top.extend(point_top)
                results[name].box.extend(box)
    return results


def _scene_ious(graphs: Mapping[str, OnnxSam], index: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per graph pair: the IoUs of the point (top-ranked of 3) and box masks of every object of scene ``index``."""
    from samserve_build import evaluation, scenes  # evaluation imports torch and the official package

    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + index)
    object_prompts = [evaluation.object_prompts(instance) for instance in scene.instances]
    count = len(object_prompts)
    prompts = [processing.Prompt(points=np.array([p.point]), labels=np.array([model_spec.LABEL_FOREGROUND]))
               for p in object_prompts]
    prompts += [processing.Prompt(box=np.array(p.box), multimask_output=False) for p in object_prompts]
    results = {}
    for name, sam in graphs.items():
        embedding, prepared = sam.embed(scene.image)
        logits, scores = sam.decode(embedding, prepared, prompts)
        multimask = processing.select_masks(True, sam.meta.num_mask_tokens)
        top = multimask.start + np.argmax(scores[:count, multimask], axis=1)
        masks = sam.masks(np.concatenate([logits[np.arange(count), top], logits[count:, 0]]), prepared)
        truth = [instance.mask for instance in scene.instances]
        results[name] = ([evaluation.iou(masks[k], mask) for k, mask in enumerate(truth)],
                         [evaluation.iou(masks[count + k], mask) for k, mask in enumerate(truth)])
    return results
