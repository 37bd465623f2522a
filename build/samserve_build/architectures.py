"""SAM architectures the exporter knows, and how to build them with the official ``segment-anything`` modules.

Meta's variants (``vit_h``, ``vit_l``, ``vit_b``) are built by the official ``sam_model_registry`` and load Meta's
released checkpoints as they are. Smaller models of the same architecture (``tiny`` for fast tests, or any
``custom`` configuration saved as JSON beside a checkpoint) are built from the same official modules by
:func:`build_sam`, so every exported graph has exactly the structure of the released models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamArchitecture:
    """Hyper-parameters of one SAM model (names follow ``segment_anything.build_sam._build_sam``)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def embedding_hw(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples), so it equals what a metadata file reads back."""
        raw = dataclasses.asdict(self)
        raw["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SamArchitecture:
        raw = dict(raw)
        raw["encoder_global_attn_indexes"] = tuple(raw["encoder_global_attn_indexes"])
        return cls(**raw)


ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    # Same modules, small widths/depths and a 256-px input: a 16 x 16 embedding and 64 x 64 mask logits,
    # so tests exercise the real graph structure and the metadata-driven sizes in seconds.
    "tiny": SamArchitecture(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=256,
        window_size=7,
        prompt_embed_dim=64,
        mask_in_chans=8,
        decoder_mlp_dim=128,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
    ),
    # The model trained here on generated scenes (build/checkpoints/, see its model card): 256-px input with
    # 8-px patches, so a 32 x 32 embedding and 128 x 128 mask logits (2 input pixels per logit).
    "scenes": SamArchitecture(
        encoder_embed_dim=128,
        encoder_depth=6,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(2, 5),
        image_size=256,
        patch_size=8,
        window_size=8,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
}
OFFICIAL_VARIANTS = ("vit_h", "vit_l", "vit_b")
ARCHITECTURE_SUFFIX = ".json"
"""A non-official checkpoint ``model.pth`` carries its architecture in ``model.json`` beside it."""


def build_sam(arch: SamArchitecture) -> Sam:
    """An untrained SAM of the given architecture from the official modules (mirrors the official ``_build_sam``)."""
    embedding_hw = arch.embedding_hw
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(arch.encoder_global_attn_indexes),
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_hw, embedding_hw),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def load_sam(variant: str, checkpoint: Path) -> Sam:
    """Load a checkpoint in Meta's format: official variants through the official registry, others through
    :func:`build_sam` with the architecture JSON found beside the checkpoint (or the registry's entry)."""
    if variant in OFFICIAL_VARIANTS:
        return sam_model_registry[variant](checkpoint=str(checkpoint)).eval()
    sam = build_sam(architecture_for(variant, checkpoint))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam.eval()


def architecture_for(variant: str, checkpoint: Path | None) -> SamArchitecture:
    """The architecture of ``variant``; for ``custom`` it is read from ``<checkpoint stem>.json``."""
    if variant in ARCHITECTURES:
        return ARCHITECTURES[variant]
    if variant != "custom" or checkpoint is None:
        raise ValueError(
            f"unknown SAM variant {variant!r}; known: {sorted(ARCHITECTURES)} or 'custom' with a checkpoint"
        )
    config = Path(checkpoint).with_suffix(ARCHITECTURE_SUFFIX)
    if not config.exists():
        raise FileNotFoundError(f"custom checkpoint {checkpoint} needs its architecture in {config}")
    return SamArchitecture.from_dict(json.loads(config.read_text()))


def random_state_dict(arch: SamArchitecture, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights in Meta's state-dict format.

    PyTorch's default initialization leaves the positional embedding and relative-position tables at zero;
    those are filled with small noise too, so that parity tests exercise every parameter.
    """
    torch.manual_seed(seed)
    sam = build_sam(arch)
    generator = torch.Generator().manual_seed(seed + 1)
    state = sam.state_dict()
    for name, tensor in state.items():
        if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return {name: tensor.clone() for name, tensor in state.items()}


def write_random_checkpoint(variant: str, seed: int, path: Path) -> Path:
    """Write seeded random weights for ``variant`` as a Meta-format checkpoint (plus architecture JSON)."""
    arch = ARCHITECTURES[variant]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(arch, seed), path)
    if variant not in OFFICIAL_VARIANTS:
        path.with_suffix(ARCHITECTURE_SUFFIX).write_text(json.dumps(arch.to_dict(), indent=2) + "\n")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
