"""The ``gpu-torch`` serving target's runtime: the official SAM modules in PyTorch, inside Triton's python backend.

The modules run are exactly those the exporter traces (:class:`samserve_build.graphs.EncoderGraph` and
:class:`~samserve_build.graphs.DecoderGraph`), built from the Meta-format checkpoint in the version folder with the
architecture recorded in the metadata, so every target computes the same function of the same tensors
(layouts: :mod:`samserve.core.model_spec`). On top of the official code:

* reduced precision by autocast (:data:`AUTOCAST`): bf16 (the default on GPUs: fp32's range, no overflow in
  ViT-H's LayerNorm) or fp16; autocast keeps LayerNorm, Softmax and the reductions in fp32 either way. ``fp32``
  for exact parity.
* scaled-dot-product attention in the image encoder (:func:`use_sdpa`): the official attention materializes the
  B*heads x HW x HW matrix and then a second one for the softmax; PyTorch's fused kernel takes the relative-position
  bias as its mask. The same function up to float rounding (tests/reference checks the masks).
* a batched encoder: Triton's dynamic batching stacks requests into one B x S x S x 3 run.

CUDA graphs for the decoder are not used: the decoder's prompt count varies per call (a graph per shape), and no GPU
was available to measure whether they pay (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from samserve.core import model_spec
from samserve_build import architectures
from samserve_build.graphs import DecoderGraph, EncoderGraph

LOG = logging.getLogger(__name__)

AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision parameter -> autocast dtype (None: plain fp32)."""


def _sdpa_attention(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` of the official image encoder with the fused kernel. x: B x H x W x dim."""
    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)  # each (B*heads) x HW x head_dim
    bias = None
    if self.use_rel_pos:  # the official add_decomposed_rel_pos, as an additive mask (B*heads) x HW x HW
        rel_h_table = get_rel_pos(height, height, self.rel_pos_h)
        rel_w_table = get_rel_pos(width, width, self.rel_pos_w)
        r_q = q.reshape(batch * self.num_heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_table.to(r_q.dtype))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_table.to(r_q.dtype))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, tokens, tokens).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def use_sdpa(encoder: torch.nn.Module) -> int:
    """Switch every attention block of an official image encoder to :func:`_sdpa_attention`; returns how many."""
    blocks = [module for module in encoder.modules() if isinstance(module, Attention)]
    for block in blocks:
        block.forward = types.MethodType(_sdpa_attention, block)
    return len(blocks)


class TorchSam:
    """Encoder and decoder of one checkpoint on one device, taking and returning the served tensors (numpy).
    ``models``: which of the two go to the device (each Triton model holds only its own part)."""

    def __init__(self, checkpoint: Path, meta: model_spec.ModelMetadata, device: str = "cuda",
                 precision: str = "bf16", sdpa: bool = True, verify_weights: bool = True,
                 models: tuple[str, ...] = (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)) -> None:
        if precision not in AUTOCAST:
            raise ValueError(f"precision {precision!r}: one of {sorted(AUTOCAST)}")
        if verify_weights and architectures.sha256_file(checkpoint) != meta.weights_sha256:
            raise ValueError(f"{checkpoint} is not the checkpoint the metadata names ({meta.weights_sha256[:12]}…)")
        self.device = torch.device(device)
        self.precision = precision
        sam = architectures.build_sam(architectures.SamArchitecture.from_dict(meta.architecture))
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        if sdpa:
            use_sdpa(sam.image_encoder)
        self.encoder = EncoderGraph(sam).to(self.device).eval() if model_spec.ENCODER_MODEL in models else None
        self.decoder = DecoderGraph(sam).to(self.device).eval() if model_spec.DECODER_MODEL in models else None
        LOG.info("%s on %s in %s (attention: %s)", meta.model_id, self.device, precision,
                 "scaled_dot_product_attention" if sdpa else "official")

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = AUTOCAST[self.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            yield

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """image uint8 B x S x S x 3, input_size int64 B x 2 -> image_embeddings float32 B x C x h x w."""
        assert self.encoder is not None, "built without the encoder"
        with self._autocast():
            embeddings = self.encoder(self._tensor(feeds[model_spec.ENC_IMAGE]),
                                      self._tensor(feeds[model_spec.ENC_INPUT_SIZE]))
        return {model_spec.ENC_EMBEDDING: embeddings.float().cpu().numpy()}

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One embedding 1 x C x h x w and N prompts -> low_res_masks N x M x 4h x 4w, iou_predictions N x M."""
        assert self.decoder is not None, "built without the decoder"
        with self._autocast():
            masks, iou = self.decoder(*(self._tensor(feeds[name]) for name in model_spec.DECODER_INPUTS))
        return {model_spec.DEC_LOW_RES_MASKS: masks.float().cpu().numpy(),
                model_spec.DEC_IOU_PREDICTIONS: iou.float().cpu().numpy()}


class TorchRunner:
    """:class:`samserve.backends.python_model.Runner` of one Triton model on :class:`TorchSam`."""

    def __init__(self, sam: TorchSam, model: str) -> None:
        self.sam = sam
        self._run = {model_spec.ENCODER_MODEL: sam.encode, model_spec.DECODER_MODEL: sam.decode}[model]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(feeds)

    def close(self) -> None:
        if self.sam.device.type == "cuda":
            torch.cuda.empty_cache()


def create_runner(path: Path, model: str, parameters: Mapping[str, str], meta: model_spec.ModelMetadata,
                  device_id: int) -> TorchRunner:
    """The runner of a gpu-torch config: ``path`` is the checkpoint; parameters ``device`` (cuda | cpu),
    ``precision`` (:data:`AUTOCAST`), ``attention`` (sdpa | official)."""
    device = parameters.get("device", "cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu-torch target found no CUDA device (render with --device cpu to run on CPUs)")
        device = f"cuda:{device_id}"
    sam = TorchSam(path, meta, device=device, precision=parameters.get(model_spec.PRECISION_PARAMETER, "bf16"),
                   sdpa=parameters.get("attention", "sdpa") == "sdpa", models=(model,))
    return TorchRunner(sam, model)
