"""bf16 emulated in fp32, for the reduced-precision mask gates on CPUs without native bf16.

``cpu-openvino-bf16`` computes the encoder's matrix products in bf16 (AVX-512-bf16 ``vdpbf16ps`` or AMX tiles: bf16
operands, fp32 accumulation) and keeps the tensors between them in bf16. A CPU without those instructions cannot
run it as served (OpenVINO falls back to fp32 there, which would make a gate pass on nothing). This pass writes the
same arithmetic into an fp32 graph that ONNX Runtime runs anywhere: both operands of every matrix product
(:data:`MATRIX_OPS`: activations and weights, not biases) and every float result are rounded to bf16 (a ``Cast`` to
bfloat16 and back, round to nearest even; weights rounded once in the file); the products are computed in fp32 from
those bf16 values, which is exact for a product of two bf16 numbers, and accumulated in fp32 as the hardware does.
What it does not model: the order of the hardware's accumulation, and the bf16 rounding of elementwise ops between
products that OpenVINO may also keep in bf16; the gates' margins cover both (where the CPU has native bf16, a test
compares the emulation with OpenVINO's own bf16 masks).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ml_dtypes  # onnx's own dependency
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

MATRIX_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
"""The ops whose operands and results are bf16 in an AVX-512-bf16 / AMX run."""


def emulation_file(graph_file: str) -> str:
    """``encoder.onnx`` -> ``encoder.bf16emu.onnx``."""
    stem, dot, suffix = graph_file.rpartition(".")
    if not dot or suffix != "onnx":
        raise ValueError(f"not an .onnx file name: {graph_file!r}")
    return f"{stem}.bf16emu.onnx"


def bf16_rounded(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to the nearest bf16 (ties to even), stored as float32."""
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def emulate_bf16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite fp32 ``model`` (external data loaded) in place: the inputs and outputs of every node of
    :data:`MATRIX_OPS` rounded to bf16. Returns the model and how many nodes were rewritten."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    float_names = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
                   if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    initializers = {tensor.name: tensor for tensor in graph.initializer if tensor.data_type == TensorProto.FLOAT}
    float_names |= set(initializers)
    rounded_weights: set[str] = set()
    rounded: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    count = 0

    def round_trip(name: str, target: str) -> list[onnx.NodeProto]:
        low = f"{target}__bf16"
        return [helper.make_node("Cast", [name], [low], name=f"{low}/Cast", to=TensorProto.BFLOAT16),
                helper.make_node("Cast", [low], [target], name=f"{target}/Cast", to=TensorProto.FLOAT)]

    for node in graph.node:
        if node.op_type not in MATRIX_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        for position, name in enumerate(node.input[:2]):  # the two operands (a bias stays fp32, as it is added)
            if not name or name not in float_names:
                continue
            if name in initializers:
                if name not in rounded_weights:
                    tensor = initializers[name]
                    tensor.CopyFrom(numpy_helper.from_array(bf16_rounded(numpy_helper.to_array(tensor)), name))
                    rounded_weights.add(name)
                continue
            if name not in rounded:
                rounded[name] = f"{name}__bf16emu"
                nodes.extend(round_trip(name, rounded[name]))
            node.input[position] = rounded[name]
        outputs = [(position, name) for position, name in enumerate(node.output) if name in float_names]
        for position, name in outputs:
            node.output[position] = f"{name}__fp32"
        nodes.append(node)
        for _, name in outputs:
            nodes.extend(round_trip(f"{name}__fp32", name))
    del graph.node[:]
    graph.node.extend(nodes)
    return model, count


def write_bf16_emulation(source: Path, destination: Path | None = None) -> Path:
    """The bf16 emulation of the fp32 graph ``source`` (:func:`emulate_bf16`), beside it by default
    (:func:`emulation_file`); written into a scratch file and moved into place, checked by onnx's checker."""
    source = Path(source)
    destination = Path(destination) if destination is not None else source.with_name(emulation_file(source.name))
    model = onnx.load(str(source), load_external_data=False)
    load_external_data_for_model(model, str(source.parent))
    model, _ = emulate_bf16(model)
    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_500_000_000  # protobuf's limit is 2 GiB
    data_name = destination.name + ".data"
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".bf16emu-") as scratch:
        written = Path(scratch) / destination.name
        if large:
            onnx.save_model(model, str(written), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(written))
        onnx.checker.check_model(str(written))
        if large:
            os.replace(written.with_name(data_name), destination.with_name(data_name))
        os.replace(written, destination)
    return destination
