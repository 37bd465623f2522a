"""Export SAM's image encoder and prompt decoder to ONNX, check them against PyTorch, write metadata.

Graphs (tensor names and layouts: :mod:`samserve.model_spec`):

* encoder: ``image`` uint8 B x S x S x 3 + ``input_size`` int64 B x 2 -> ``image_embeddings`` B x C x h x w.
  Normalization by pixel mean/std and zeroing of the padding (after normalization, as ``Sam.preprocess``) are
  inside the graph; B is dynamic.
* decoder: one ``image_embeddings`` 1 x C x h x w and N prompts of P tokens -> ``low_res_masks`` N x 4 x 4h x 4w
  and ``iou_predictions`` N x 4 for all mask tokens. N and P are dynamic. No upscaling in the graph.
* no-mask decoder (``decoder.nomask.onnx``): the decoder for N prompts none of which has a mask input
  (``image_embeddings``, ``point_coords``, ``point_labels`` only; the same outputs). The first transformer layer's
  image-side projections run once per image instead of once per prompt (:class:`NoMaskDecoderGraph`).

After export each graph runs in ONNX Runtime (the session the CPU target serves with) on fresh random inputs
and must match PyTorch to a relative error below ``RELATIVE_TOLERANCE``; otherwise the export fails.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from samserve import model_spec, onnx_backend
from samserve_build import architectures, prompt_tokens

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


class EncoderGraph(nn.Module):
    """Normalization + padding + ViT image encoder, as ``Sam.preprocess`` followed by ``image_encoder``."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.image_size = sam.image_encoder.img_size
        self.register_buffer("pixel_mean", sam.pixel_mean.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.reshape(1, -1, 1, 1).clone(), persistent=False)

    def forward(self, image: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        """image: uint8 B x S x S x 3; input_size: int64 B x 2 (h, w). Returns B x C x h' x w'."""
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.get_buffer("pixel_mean")) / self.get_buffer("pixel_std")
        positions = torch.arange(self.image_size, device=image.device).unsqueeze(0)  # 1 x S
        valid_rows = positions < input_size[:, 0:1]  # B x S
        valid_cols = positions < input_size[:, 1:2]  # B x S
        valid = valid_rows.unsqueeze(2) & valid_cols.unsqueeze(1)  # B x S x S
        x = x * valid.unsqueeze(1).to(x.dtype)
        return self.image_encoder(x)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for one embedding and N prompts; all mask tokens, no upscaling.

    Point tokens are embedded by :func:`prompt_tokens.embed_point_tokens` (as the official ``SamOnnxModel``, which
    equals ``PromptEncoder`` for points, padding and box corners); ``has_mask_input`` is per prompt.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masks, iou_predictions = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=prompt_tokens.embed_point_tokens(self.prompt_encoder, point_coords, point_labels),
            dense_prompt_embeddings=self._embed_masks(mask_input, has_mask_input),
        )
        return masks, iou_predictions


class NoMaskReference(nn.Module):
    """:class:`DecoderGraph` with ``has_mask_input`` = 0 (and a zero ``mask_input``) for every prompt: what
    :class:`NoMaskDecoderGraph` must equal. image_embeddings 1 x C x h x w, point_coords N x P x 2, point_labels
    N x P -> low_res_masks N x M x 4h x 4w, iou_predictions N x M."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.decoder = DecoderGraph(sam)

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = point_coords.shape[0]
        mask_h, mask_w = self.decoder.prompt_encoder.mask_input_size
        mask_input = torch.zeros((prompts, 1, mask_h, mask_w), dtype=image_embeddings.dtype)
        has_mask_input = torch.zeros((prompts,), dtype=image_embeddings.dtype)
        return self.decoder(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)


def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The official ``Attention.forward`` after its input projections, with broadcasting over the batch.

    q: Bq x Tq x D, k and v: Bk x Tk x D, already projected (D = the attention's ``internal_dim``, C divided by its
    downsample rate); Bq and Bk are each N or 1 (one side shared by all N prompts). Heads are separated and
    recombined with the module's own ``_separate_heads``/``_recombine_heads`` (B x heads x T x D/heads); the
    batched matmuls broadcast the batch axis of size 1. Returns max(Bq, Bk) x Tq x C (after ``out_proj``).
    """
    heads = attention.num_heads
    q = attention._separate_heads(q, heads)  # Bq x heads x Tq x D/heads
    k = attention._separate_heads(k, heads)  # Bk x heads x Tk x D/heads
    v = attention._separate_heads(v, heads)  # Bk x heads x Tk x D/heads
    c_per_head = attention.internal_dim // heads
    attn = q @ k.permute(0, 1, 3, 2)  # B x heads x Tq x Tk
    attn = attn / math.sqrt(c_per_head)
    attn = torch.softmax(attn, dim=-1)
    out = attn @ v  # B x heads x Tq x D/heads
    return attention.out_proj(attention._recombine_heads(out))


class NoMaskDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for one embedding and N prompts WITHOUT mask input; all mask tokens.

    Inputs: ``image_embeddings`` float32 1 x C x h x w, ``point_coords`` float32 N x P x 2 (x, y in resized-input
    pixels), ``point_labels`` float32 N x P (:mod:`samserve.model_spec` labels). Outputs: ``low_res_masks`` float32
    N x M x 4h x 4w and ``iou_predictions`` float32 N x M, equal to :class:`DecoderGraph`'s with ``has_mask_input``
    = 0 for every prompt (:class:`NoMaskReference`).

    The official ``MaskDecoder.predict_masks`` repeats the image embedding N times and runs the two-way transformer
    on N copies. Without mask inputs the dense prompt embedding is ``no_mask_embed`` for every prompt, so the
    image tokens (``src`` = embedding + no_mask_embed, 1 x hw x C) and their positional encoding (1 x hw x C) are
    the same for all prompts until the first layer's image -> token attention updates them. This graph re-implements
    ``predict_masks`` and ``TwoWayTransformer.forward`` with the official modules (their Linear layers, LayerNorms,
    MLPs, upscaling, hypernetwork MLPs and IoU head; no weight is copied) so that the first layer's three
    image-side projections (``cross_attn_token_to_image.k_proj(keys + key_pe)`` and ``.v_proj(keys)``,
    ``cross_attn_image_to_token.q_proj(keys + key_pe)``) run once on 1 x hw x C and broadcast over the N prompts
    (batched matmul), and the N-fold image tokens first exist as the first layer's output (N x hw x C). The later
    layers, the final attention and the upscaling run per prompt as the official modules do.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    @staticmethod
    def _first_layer(
        block: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``TwoWayAttentionBlock.forward`` with image tokens shared by all prompts.

        queries, query_pe: N x T x C (T = 1 + M + P tokens); keys, key_pe: 1 x hw x C (image tokens and their
        positional encoding, shared). Returns queries N x T x C and keys N x hw x C.
        """
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        queries = block.norm1(queries)

        # Tokens attending to the image: keys and values are the image's, projected once (1 x hw x D).
        token_to_image = block.cross_attn_token_to_image
        keys_with_pe = keys + key_pe  # 1 x hw x C
        attn_out = _attend(
            token_to_image,
            token_to_image.q_proj(queries + query_pe),  # N x T x D
            token_to_image.k_proj(keys_with_pe),  # 1 x hw x D
            token_to_image.v_proj(keys),  # 1 x hw x D
        )
        queries = block.norm2(queries + attn_out)

        queries = block.norm3(queries + block.mlp(queries))

        # The image attending to the tokens: its queries are the image's, projected once (1 x hw x D).
        image_to_token = block.cross_attn_image_to_token
        attn_out = _attend(
            image_to_token,
            image_to_token.q_proj(keys_with_pe),  # 1 x hw x D
            image_to_token.k_proj(queries + query_pe),  # N x T x D
            image_to_token.v_proj(queries),  # N x T x D
        )  # N x hw x C
        keys = block.norm4(keys + attn_out)  # the shared residual broadcasts: N x hw x C
        return queries, keys

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings 1 x C x h x w, point_coords N x P x 2, point_labels N x P -> low_res_masks
        N x M x 4h x 4w, iou_predictions N x M."""
        decoder = self.mask_decoder
        transformer = decoder.transformer
        sparse = prompt_tokens.embed_point_tokens(self.prompt_encoder, point_coords, point_labels)  # N x P x C
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1 + M) x C
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)  # N x T x C

        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = image_embeddings + no_mask  # 1 x C x h x w: the same for every prompt
        _, c, h, w = src.shape
        keys = src.flatten(2).permute(0, 2, 1)  # 1 x hw x C
        key_pe = self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)  # 1 x hw x C

        queries, keys = self._first_layer(transformer.layers[0], tokens, keys, tokens, key_pe)
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)  # N x hw x C
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        hs = transformer.norm_final_attn(queries + attn_out)  # N x T x C
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

        src = keys.transpose(1, 2).reshape(-1, c, h, w)  # N x C x h x w
        upscaled = decoder.output_upscaling(src)  # N x C/8 x 4h x 4w
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # N x M x C/8
        n, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.view(n, cu, hu * wu)).view(n, -1, hu, wu)
        iou_predictions = decoder.iou_prediction_head(iou_token_out)
        return masks, iou_predictions


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
    session = onnx_backend.create_session(path)
    worst: dict[str, float] = {name: 0.0 for name in output_names}
    for feeds in inputs:
        got = onnx_backend.run(session, feeds)
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
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
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
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
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
    """Write seeded random weights as a Meta-format checkpoint beside ``out_dir`` and export them."""
    out_dir = Path(out_dir)
    checkpoint = architectures.write_random_checkpoint(
        variant, seed, out_dir.with_name(out_dir.name + "-checkpoint") / f"{variant}-seed{seed}.pth"
    )
    return export_model(variant, checkpoint, out_dir, model_id=model_id or f"{variant}-random-seed{seed}")
