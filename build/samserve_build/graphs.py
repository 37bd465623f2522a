"""The traced graphs: SAM's official modules wrapped as the tensors the service moves (layouts:
:mod:`samserve.core.model_spec`). The exporter (:mod:`samserve_build.export`) traces them to ONNX and the gpu-torch
runtime
(:mod:`samserve_build.torch_runtime`) runs them as they are, so both compute one function.

This module imports only PyTorch, the official ``segment_anything`` and samserve modules that need neither ONNX nor
ONNX Runtime: the GPU Triton image runs it without the exporter's dependencies (``tests/unit/test_runtime_imports.py``).

* :class:`EncoderGraph`: ``image`` uint8 B x S x S x 3 + ``input_size`` int64 B x 2 -> ``image_embeddings``
  float32 B x C x h x w (normalization and the zeroed padding inside).
* :class:`DecoderGraph`: one embedding 1 x C x h x w and N prompts of P tokens -> ``low_res_masks``
  N x M x 4h x 4w and ``iou_predictions`` N x M (all M mask tokens, no upscaling).
* :class:`NoMaskDecoderGraph`: the decoder for N prompts none of which has a mask input (the first layer's
  image-side projections once per image); :class:`NoMaskReference` is what it must equal.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from samserve_build import prompt_embedding


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

    Point tokens are embedded by :func:`prompt_embedding.embed_point_tokens` (as the official ``SamOnnxModel``, which
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
            sparse_prompt_embeddings=prompt_embedding.embed_point_tokens(self.prompt_encoder, point_coords,
                                                                         point_labels),
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
    pixels), ``point_labels`` float32 N x P (:mod:`samserve.core.model_spec` labels). Outputs: ``low_res_masks`` float32
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
        sparse = prompt_embedding.embed_point_tokens(self.prompt_encoder, point_coords, point_labels)  # N x P x C
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
