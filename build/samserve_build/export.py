"""Export SAM's image encoder and prompt decoder to ONNX, check them against PyTorch, write metadata.

Graphs (tensor names and layouts: :mod:`samserve.core.model_spec`):

* encoder: ``image`` uint8 B x S x S x 3 + ``input_size`` int64 B x 2 -> ``image_embeddings`` B x C x h x w.
  Normalization by pixel mean/std and zeroing of the padding (after normalization, as ``Sam.preprocess``) are
  inside the graph; B is dynamic.
* decoder: one ``image_embeddings`` 1 x C x h x w and N prompts of P tokens -> ``low_res_masks`` N x 4 x 4h x 4w
  and ``iou_predictions`` N x 4 for all mask tokens. N and P are dynamic. No upscaling in the graph.
* no-mask decoder (``decoder.nomask.onnx``): the decoder for N prompts none of which has a mask input
  (``image_embeddings``, ``point_coords``, ``point_labels`` only; the same outputs). The first transformer layer's
  image-side projections run once per image instead of once per prompt
  (:class:`~samserve_build.graphs.NoMaskDecoderGraph`).

The traced modules live in :mod:`samserve_build.graphs` (no ONNX import there: the gpu-torch runtime runs them).

After export each graph runs in ONNX Runtime (the session the CPU target serves with) on fresh random inputs
and must match PyTorch to a relative error below ``RELATIVE_TOLERANCE``; otherwise the export fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from segment_anything.modeling import Sam
from torch import nn

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve_build import architectures, workdir
from samserve_build.graphs import DecoderGraph, EncoderGraph, NoMaskDecoderGraph, NoMaskReference

LOG = logging.getLogger(__name__)
EXPORTER_VERSION = "samserve-export/2"
"""Recorded in the metadata (2: adds ``decoder.nomask.onnx``)."""
OPSET = 17
RELATIVE_TOLERANCE = 1e-4
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
"""Graphs whose weights exceed this are saved with external data (protobuf's hard limit is 2 GiB; ViT-H's
encoder is 2.5 GB)."""


class ExportCheckError(RuntimeError):
    """An exported graph disagrees with PyTorch."""


def _rgb(values: torch.Tensor) -> tuple[float, float, float]:
    """A per-channel normalization constant (3 values), rounded as the metadata records it."""
    red, green, blue = (round(float(v), 4) for v in values.flatten())
    return red, green, blue


def model_metadata(sam: Sam, variant: str, weights_sha256: str, model_id: str, arch: dict) -> model_spec.ModelMetadata:
    """Metadata of ``sam`` (sizes measured from the modules, never assumed)."""
    image_size = int(sam.image_encoder.img_size)
    embed_h, embed_w = sam.prompt_encoder.image_embedding_size
    mask_h, mask_w = sam.prompt_encoder.mask_input_size
    channels = int(sam.prompt_encoder.embed_dim)
    return model_spec.ModelMetadata(
        model_id=model_id,
        variant=variant,
        weights_sha256=weights_sha256,
        image_size=image_size,
        embedding_shape=(channels, int(embed_h), int(embed_w)),
        low_res_mask_size=(int(mask_h), int(mask_w)),
        num_mask_tokens=int(sam.mask_decoder.num_mask_tokens),
        mask_threshold=float(sam.mask_threshold),
        pixel_mean=_rgb(sam.pixel_mean),
        pixel_std=_rgb(sam.pixel_std),
        preprocessing_version=model_spec.PREPROCESSING_VERSION,
        exporter_version=f"{EXPORTER_VERSION} torch-{torch.__version__} onnx-opset-{OPSET}",
        architecture=arch,
    )


def encoder_inputs(meta: model_spec.ModelMetadata, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random encoder inputs: B images with random resized sizes (longest side S), zero padding."""
    size = meta.image_size
    image = np.zeros((batch, size, size, 3), dtype=np.uint8)
    input_size = np.zeros((batch, 2), dtype=np.int64)
    for b in range(batch):
        short = int(rng.integers(1, size + 1))
        h, w = (size, short) if rng.random() < 0.5 else (short, size)
        image[b, :h, :w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        input_size[b] = (h, w)
    return {model_spec.ENC_IMAGE: image, model_spec.ENC_INPUT_SIZE: input_size}


def decoder_inputs(
    meta: model_spec.ModelMetadata, prompts: int, tokens: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random decoder inputs: N prompts of P tokens with every label kind, half of them with a mask input."""
    labels = rng.choice(
        [model_spec.LABEL_PADDING, model_spec.LABEL_BACKGROUND, model_spec.LABEL_FOREGROUND,
         model_spec.LABEL_BOX_TOP_LEFT, model_spec.LABEL_BOX_BOTTOM_RIGHT],
        size=(prompts, tokens),
    ).astype(np.float32)
    return {
        model_spec.DEC_EMBEDDING: rng.standard_normal((1, *meta.embedding_shape), dtype=np.float32),
        model_spec.DEC_POINT_COORDS: rng.uniform(0, meta.image_size, size=(prompts, tokens, 2)).astype(np.float32),
        model_spec.DEC_POINT_LABELS: labels,
        model_spec.DEC_MASK_INPUT: rng.standard_normal((prompts, 1, *meta.low_res_mask_size), dtype=np.float32) * 5,
        model_spec.DEC_HAS_MASK_INPUT: (np.arange(prompts) % 2).astype(np.float32),
    }


def no_mask_decoder_inputs(
    meta: model_spec.ModelMetadata, prompts: int, tokens: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random no-mask decoder inputs (:data:`model_spec.NO_MASK_DECODER_INPUTS`): those of :func:`decoder_inputs`
    without the mask input."""
    feeds = decoder_inputs(meta, prompts, tokens, rng)
    return {name: feeds[name] for name in model_spec.NO_MASK_DECODER_INPUTS}


def written_by_this_exporter(meta: model_spec.ModelMetadata) -> bool:
    """Whether an export folder's graphs are this exporter's (an older one lacks files the targets now serve)."""
    return meta.exporter_version.split(" ")[0] == EXPORTER_VERSION


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    scale = float(np.max(np.abs(expected))) or 1.0
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) / scale


def check_graph(
    path: Path,
    module: nn.Module,
    inputs: list[dict[str, np.ndarray]],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
) -> dict[str, float]:
    """Run ``path`` in ONNX Runtime and ``module`` in PyTorch on each input set; raise if they disagree."""
    session = onnx_runner.create_session(path)
    worst: dict[str, float] = {name: 0.0 for name in output_names}
    for feeds in inputs:
        got = onnx_runner.run(session, feeds)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[name]) for name in input_names))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        for name, reference in zip(output_names, expected, strict=True):
            if got[name].shape != tuple(reference.shape):
                raise ExportCheckError(
                    f"{path.name}: {name} shape {got[name].shape} != PyTorch {tuple(reference.shape)}")
            worst[name] = max(worst[name], relative_error(got[name], reference.numpy()))
    for name, error in worst.items():
        if not error < RELATIVE_TOLERANCE:
            raise ExportCheckError(f"{path.name}: {name} relative error {error:.3g} >= {RELATIVE_TOLERANCE} vs PyTorch")
    return worst


def _save_onnx(
    graph: nn.Module,
    example: dict[str, np.ndarray],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    force_external: bool = False,
) -> None:
    """Export ``graph`` (TorchScript exporter, opset 17) to ``path``.

    Graphs whose weights exceed EXTERNAL_DATA_THRESHOLD_BYTES (or with ``force_external``) keep their weights in
    one ``<path>.data`` file beside it. The exporter writes into a scratch folder first, since it may split
    large weights into many files itself.
    """
    parameter_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / path.name
        torch.onnx.export(
            graph,
            tuple(torch.from_numpy(example[name]) for name in input_names),
            str(raw),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        split = len(list(Path(scratch).iterdir())) > 1
        if parameter_bytes > EXTERNAL_DATA_THRESHOLD_BYTES or force_external or split:
            model = onnx.load(str(raw), load_external_data=True)
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=path.name + ".data", size_threshold=1024,
            )
            os.chmod(path.with_name(path.name + ".data"), 0o644)  # readable by a Triton running as another user
        else:
            raw.replace(path)


def export_encoder(sam: Sam, path: Path, meta: model_spec.ModelMetadata, force_external: bool = False) -> EncoderGraph:
    graph = EncoderGraph(sam).eval()
    batch_axis = {name: {0: "batch"} for name in (*model_spec.ENCODER_INPUTS, *model_spec.ENCODER_OUTPUTS)}
    _save_onnx(graph, encoder_inputs(meta, 1, np.random.default_rng(0)), model_spec.ENCODER_INPUTS,
               model_spec.ENCODER_OUTPUTS, batch_axis, path, force_external)
    return graph


def export_decoder(sam: Sam, path: Path, meta: model_spec.ModelMetadata) -> DecoderGraph:
    graph = DecoderGraph(sam).eval()
    prompt_axes = {0: "prompts", 1: "tokens"}
    dynamic_axes = {
        model_spec.DEC_POINT_COORDS: prompt_axes,
        model_spec.DEC_POINT_LABELS: prompt_axes,
        model_spec.DEC_MASK_INPUT: {0: "prompts"},
        model_spec.DEC_HAS_MASK_INPUT: {0: "prompts"},
        model_spec.DEC_LOW_RES_MASKS: {0: "prompts"},
        model_spec.DEC_IOU_PREDICTIONS: {0: "prompts"},
    }
    _save_onnx(graph, decoder_inputs(meta, 2, 3, np.random.default_rng(0)), model_spec.DECODER_INPUTS,
               model_spec.DECODER_OUTPUTS, dynamic_axes, path)
    return graph


def export_decoder_no_mask(sam: Sam, path: Path, meta: model_spec.ModelMetadata) -> NoMaskDecoderGraph:
    graph = NoMaskDecoderGraph(sam).eval()
    prompt_axes = {0: "prompts", 1: "tokens"}
    dynamic_axes = {
        model_spec.DEC_POINT_COORDS: prompt_axes,
        model_spec.DEC_POINT_LABELS: prompt_axes,
        model_spec.DEC_LOW_RES_MASKS: {0: "prompts"},
        model_spec.DEC_IOU_PREDICTIONS: {0: "prompts"},
    }
    _save_onnx(graph, no_mask_decoder_inputs(meta, 2, 3, np.random.default_rng(0)), model_spec.NO_MASK_DECODER_INPUTS,
               model_spec.DECODER_OUTPUTS, dynamic_axes, path)
    return graph


@dataclasses.dataclass(frozen=True)
class ExportResult:
    directory: Path
    checkpoint: Path
    metadata: model_spec.ModelMetadata
    encoder_error: float
    decoder_error: float
    seconds: float
    decoder_no_mask_error: float = 0.0
    """Relative error of ``decoder.nomask.onnx`` against :class:`DecoderGraph` with no mask input."""


def _export_into(variant: str, checkpoint: Path, staging: Path, model_id: str | None, force_external_data: bool
                 ) -> tuple[model_spec.ModelMetadata, tuple[dict[str, float], dict[str, float], dict[str, float]]]:
    """Export and check the three graphs and write the metadata into the empty folder ``staging``; the metadata and
    the relative errors (by output name) of the encoder, the decoder and the no-mask decoder."""
    arch = architectures.architecture_for(variant, checkpoint)
    LOG.info("loading %s checkpoint %s", variant, checkpoint)
    sam = architectures.load_sam(variant, checkpoint)
    weights_sha256 = architectures.sha256_file(checkpoint)
    meta = model_metadata(sam, variant, weights_sha256, model_id or variant, arch.to_dict())

    rng = np.random.default_rng(int(weights_sha256[:8], 16))
    LOG.info("exporting encoder (image size %d)", meta.image_size)
    encoder = export_encoder(sam, staging / model_spec.ENCODER_FILE, meta, force_external_data)
    encoder_error = check_graph(
        staging / model_spec.ENCODER_FILE, encoder, [encoder_inputs(meta, 2, rng)],
        model_spec.ENCODER_INPUTS, model_spec.ENCODER_OUTPUTS,
    )
    LOG.info("encoder matches PyTorch: relative error %s", encoder_error)
    LOG.info("exporting decoder")
    decoder = export_decoder(sam, staging / model_spec.DECODER_FILE, meta)
    decoder_error = check_graph(
        staging / model_spec.DECODER_FILE, decoder,
        [decoder_inputs(meta, n, p, rng) for n, p in ((1, 1), (3, 2), (5, 4))],
        model_spec.DECODER_INPUTS, model_spec.DECODER_OUTPUTS,
    )
    LOG.info("decoder matches PyTorch: relative error %s", decoder_error)
    LOG.info("exporting no-mask decoder")
    export_decoder_no_mask(sam, staging / model_spec.DECODER_NO_MASK_FILE, meta)
    decoder_no_mask_error = check_graph(
        staging / model_spec.DECODER_NO_MASK_FILE, NoMaskReference(sam).eval(),
        [no_mask_decoder_inputs(meta, n, p, rng) for n, p in ((1, 1), (3, 2), (5, 4))],
        model_spec.NO_MASK_DECODER_INPUTS, model_spec.DECODER_OUTPUTS,
    )
    LOG.info("no-mask decoder matches PyTorch: relative error %s", decoder_no_mask_error)
    meta.write(staging)
    return meta, (encoder_error, decoder_error, decoder_no_mask_error)


@torch.no_grad()   # as a scope: the caller's autograd state is left as it was
def export_model(
    variant: str,
    checkpoint: Path,
    out_dir: Path,
    model_id: str | None = None,
    force_external_data: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` (Meta's state-dict format) to ``out_dir``/{encoder,decoder,decoder.nomask}.onnx +
    metadata.json.

    Writes into a temporary folder first and renames it into place only after both checks pass, so a failed
    or interrupted export never leaves a half-written model behind.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    staging = workdir.unique_dir(out_dir.parent, f".{out_dir.name}.staging-")  # this export's own: none shares it
    try:
        meta, errors = _export_into(variant, checkpoint, staging, model_id, force_external_data)
        workdir.replace_dir(staging, out_dir)
    finally:
        workdir.remove(staging)  # gone already once in place
    encoder_error, decoder_error, decoder_no_mask_error = errors
    return ExportResult(
        directory=out_dir,
        checkpoint=Path(checkpoint),
        metadata=meta,
        encoder_error=max(encoder_error.values()),
        decoder_error=max(decoder_error.values()),
        seconds=time.perf_counter() - started,
        decoder_no_mask_error=max(decoder_no_mask_error.values()),
    )


def export_random_weights(variant: str, seed: int, out_dir: Path, model_id: str | None = None) -> ExportResult:
    """Write seeded random weights as a Meta-format checkpoint beside ``out_dir`` and export them.

    The checkpoint (and its architecture file) is written into a staging folder of its own and renamed into
    ``<out_dir>-checkpoint/`` file by file, so a reader never sees a half-written one."""
    out_dir = Path(out_dir)
    folder = out_dir.with_name(out_dir.name + "-checkpoint")
    staging = workdir.unique_dir(folder, ".staging-")
    try:
        written = architectures.write_random_checkpoint(variant, seed, staging / f"{variant}-seed{seed}.pth")
        for path in sorted(staging.iterdir(), key=lambda path: path == written):  # the checkpoint last
            os.replace(path, folder / path.name)
    finally:
        workdir.remove(staging)
    checkpoint = folder / written.name
    return export_model(variant, checkpoint, out_dir, model_id=model_id or f"{variant}-random-seed{seed}")
