"""Prompt tokens -> sparse prompt embeddings: the ONE implementation used by the exported decoder graph and training.

Tokens are laid out as ``SamPredictor`` sends them (and as :func:`samserve.vision.processing.point_inputs` builds
them):
clicks first, then either one padding token or the two box corners. Labels are those of
:mod:`samserve.core.model_spec` (``LABEL_*``).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import PromptEncoder

from samserve.core import model_spec

POINT_EMBEDDING_LABELS = (
    model_spec.LABEL_BACKGROUND,
    model_spec.LABEL_FOREGROUND,
    model_spec.LABEL_BOX_TOP_LEFT,
    model_spec.LABEL_BOX_BOTTOM_RIGHT,
)
"""The label each of ``PromptEncoder.point_embeddings`` belongs to, in order (the official encoder's layout)."""


def embed_point_tokens(prompt_encoder: PromptEncoder, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """N x P x 2 (x, y) coordinates in resized-and-padded input pixels and N x P float labels -> N x P x C sparse
    prompt embeddings.

    Equals the official ``PromptEncoder._embed_points``/``_embed_boxes`` for SamPredictor's token layouts, written
    as the official ``SamOnnxModel`` writes it (masks by multiplication, no in-place ops) so that it exports to
    ONNX unchanged and trains with the same gradients. SAM's input is square: coordinates are divided by its side.
    """
    image_size = prompt_encoder.input_image_size[0]
    embedding = prompt_encoder.pe_layer._pe_encoding((coords + 0.5) / image_size)  # N x P x C
    expanded = labels.unsqueeze(-1).expand_as(embedding)
    embedding = embedding * (expanded != model_spec.LABEL_PADDING)
    embedding = embedding + prompt_encoder.not_a_point_embed.weight * (expanded == model_spec.LABEL_PADDING)
    for point_embedding, label in zip(prompt_encoder.point_embeddings, POINT_EMBEDDING_LABELS, strict=True):
        embedding = embedding + point_embedding.weight * (expanded == label)
    return embedding
