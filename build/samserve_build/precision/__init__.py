"""Mixed-precision ONNX graphs: fp16 (or bf16) written into the exported graphs, the sensitive ops kept in fp32.

TensorRT 11 builds strongly typed networks only: every tensor has the dtype the ONNX graph gives it (the builder's
fp16 flag is gone), so the precision has to be in the graph itself. This pass (:mod:`.analysis` chooses the nodes,
:mod:`.rewriter` writes the graph, :mod:`.graph_io` reads and saves files) rewrites an fp32 graph written by
:mod:`samserve_build.export` into ``<name>.fp16.onnx`` (:func:`mixed_precision_file`):

* Low precision: every node on the float path from the graph's inputs to its float outputs (the activations),
  unless listed below. Its float inputs are fed in low precision (a ``Cast`` where the producer is fp32), its
  outputs are low precision, the initializers it reads are stored in low precision (the file is about half the
  size). A ``Cast`` to float32 on that path (the encoder's uint8 pixels, the padding mask) casts to the low type.
* fp32, and why:

  - LayerNorm, as a ``LayerNormalization`` node or decomposed by the exporter (``ReduceMean``, ``Sub``, ``Pow``,
    ``ReduceMean``, ``Add``, ``Sqrt``, ``Div`` and the affine ``Mul``/``Add`` after it: SAM's ``LayerNorm2d``):
    ViT-H's residual stream overflows fp16 (largest finite 65504) in the mean of squares, and the normalized
    output loses the small differences a large mean leaves. Also ``Softmax`` (exp of logits), other reductions,
    ``Pow``/``Sqrt``/``Exp``/``Log`` and normalizations wherever they occur (:data:`FP32_OPS`).
  - The image encoder's neck (:data:`FP32_SCOPES`: the 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d after the last
    transformer block): it reads the last block's residual stream, its LayerNorm2d squares the largest values of
    the encoder (up to 3.7e3 in the shipped scenes model, whose transformer activations stay below 30), and its
    output is the float32 embedding that every decoder call reuses; it is under 1 % of ViT-H's encoder FLOPs.
  - ``Sin``/``Cos`` and every node computing their arguments (the random Fourier positional encoding of the prompt
    coordinates): fp16 rounds an argument of 25 radians by up to 0.008, a position error the whole decoder sees.
    These are tensors of a few hundred values.
  - Float arithmetic off the activation path (no float path to a graph output): the relative-position index
    computation that ends in a ``Cast`` to int64, shape arithmetic. It is tiny, and indices must be exact.
  - A node reading a constant that low precision cannot hold (finite, beyond fp16's range).
  - A node whose ONNX schema (at the graph's opset) has no such type: for bf16 at opset 17 ``Conv``,
    ``ConvTranspose`` and ``Einsum`` (so the bf16 file keeps the convolution weights in float32); a float
    ``Range`` in either; anything outside the default domain or with subgraphs.

  :class:`MixedPrecisionReport` records what stayed fp32 (by op type and by reason) and how many nodes were
  converted.
* The interface does not change: graph inputs and outputs keep their names, dtypes and shapes (encoder: ``image``
  uint8 B x S x S x 3 and ``input_size`` int64 B x 2 -> ``image_embeddings`` float32 B x C x h x w; decoder:
  float32 ``image_embeddings`` 1 x C x h x w, ``point_coords`` N x P x 2, ``point_labels`` N x P, ``mask_input``
  N x 1 x 4h x 4w, ``has_mask_input`` N -> float32 ``low_res_masks`` N x M x 4h x 4w and ``iou_predictions``
  N x M; :mod:`samserve.core.model_spec`). The casts are inside the graph, so Triton configs and gateway are unchanged.

bf16 has fp32's range, so nothing overflows; the same ops stay fp32 for their precision (bf16 has 8 significant
bits against fp16's 11).

Checking on the CPU (:mod:`samserve_build.graph_quality`, tests/integration/test_mixed_precision.py,
bench/precision_cpu.py): ONNX
Runtime's CPU provider runs fp16 nodes by inserting casts to fp32 around the nodes it has no fp16 kernel for,
so a CPU run catches fp16 *storage* rounding and overflow (inf/NaN) at node boundaries, not fp16 arithmetic
inside a kernel (accumulation order, fp16 accumulators) as a GPU runs it. ONNX Runtime's CPU provider cannot run
the bf16 graphs (no bf16 kernel for Sub, Mul, ...: session creation fails): they are written and pass onnx's
checker, but only fp16 is gated on masks on the CPU.
"""


from samserve_build.precision.analysis import DATA_MOVEMENT_OPS, FP32_OPS, FP32_SCOPES, TRIG_OPS, Precision
from samserve_build.precision.graph_io import (
    EXTERNAL_DATA_THRESHOLD_BYTES,
    MixedPrecisionReport,
    graph_bytes,
    mixed_precision_file,
    write_mixed_precision,
    write_mixed_precision_model,
)
from samserve_build.precision.rewriter import ConversionCounts, convert_model

__all__ = [
    "DATA_MOVEMENT_OPS", "EXTERNAL_DATA_THRESHOLD_BYTES", "FP32_OPS", "FP32_SCOPES", "TRIG_OPS", "ConversionCounts",
    "MixedPrecisionReport", "Precision", "convert_model", "graph_bytes", "mixed_precision_file",
    "write_mixed_precision", "write_mixed_precision_model",
]
