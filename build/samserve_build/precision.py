"""Mixed-precision ONNX graphs: fp16 (or bf16) written into the exported graphs, the sensitive ops kept in fp32.

TensorRT 11 builds strongly typed networks only: every tensor has the dtype the ONNX graph gives it (the builder's
fp16 flag is gone), so the precision has to be in the graph itself. This pass rewrites an fp32 graph written by
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
  N x M; :mod:`samserve.model_spec`). The casts are inside the graph, so Triton configs and gateway are unchanged.

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

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from samserve import model_spec

LOG = logging.getLogger(__name__)


class Precision(enum.StrEnum):
    """The low precision of a mixed graph (its value is the file-name infix, see :func:`mixed_precision_file`)."""

    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def onnx_type(self) -> int:
        """The ``TensorProto`` element type."""
        return TensorProto.FLOAT16 if self is Precision.FP16 else TensorProto.BFLOAT16


FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization", "LpNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos",
})
"""Op types kept in fp32 wherever they occur: normalizations, softmax, reductions (fp16 sums overflow), powers,
roots, exponentials and logarithms, and trigonometry (its argument error is absolute)."""
TRIG_OPS = frozenset({"Sin", "Cos"})
"""Ops whose argument chains stay fp32 too (see the module docstring)."""
FP32_SCOPES = ("/image_encoder/neck/",)
"""Node-name prefixes (the exporter's module scopes) kept in fp32: the image encoder's neck."""
DATA_MOVEMENT_OPS = frozenset({
    "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Tile", "Concat", "Slice",
    "Split", "Gather", "GatherElements", "Pad", "DepthToSpace", "SpaceToDepth",
})
"""Ops that only move values: they take the precision of their consumers when those all compute in fp32 (e.g.
the ``Identity`` the exporter puts between a shared LayerNorm weight and its LayerNorms), so no value makes a
needless round trip through low precision."""
FP16_MAX = float(np.finfo(np.float16).max)
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000
"""A mixed graph whose initializers exceed this is saved with external data ``<file>.data`` (protobuf's hard limit
is 2 GiB; ViT-H's fp16 encoder is about 1.3 GB and stays one file)."""
_FLOAT = TensorProto.FLOAT


def mixed_precision_file(graph_file: str, precision: Precision) -> str:
    """The mixed graph's file name: ``encoder.onnx`` -> ``encoder.fp16.onnx`` (a folder in front is kept)."""
    stem, dot, suffix = graph_file.rpartition(".")
    if not dot or not stem or suffix != "onnx":
        raise ValueError(f"not an .onnx file name: {graph_file!r}")
    return f"{stem}.{Precision(precision).value}.onnx"


@dataclasses.dataclass(frozen=True)
class MixedPrecisionReport:
    """What :func:`write_mixed_precision` did to one graph."""

    source: Path
    destination: Path
    precision: Precision
    converted_nodes: int
    """Nodes that compute in low precision."""
    converted_op_types: Mapping[str, int]
    kept_fp32_op_types: Mapping[str, int]
    """Nodes on the activation path kept in fp32, by op type."""
    kept_fp32_reasons: Mapping[str, int]
    """The same nodes by reason: ``op`` (:data:`FP32_OPS`), ``layernorm`` (decomposed), ``scope``
    (:data:`FP32_SCOPES`), ``trig-argument``, ``constant-range``, ``unsupported-type``, ``fp32-consumers``
    (:data:`DATA_MOVEMENT_OPS`)."""
    off_path_fp32_nodes: int
    """Float nodes off the activation path (index and shape arithmetic), left in fp32."""
    casts_inserted: int
    initializers_converted: int
    source_bytes: int
    """The source graph's file(s), external data included."""
    destination_bytes: int
    external_data: bool

    def summary(self) -> str:
        kept = ", ".join(f"{op} {count}" for op, count in sorted(self.kept_fp32_op_types.items()))
        return (f"{self.destination.name}: {self.converted_nodes} nodes in {self.precision}, fp32 kept: {kept} "
                f"(+{self.off_path_fp32_nodes} off-path), {self.casts_inserted} casts, "
                f"{self.source_bytes / 2**20:.1f} MiB -> {self.destination_bytes / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _NodeTypes:
    """Which input and output positions of a node carry the float32 type parameter that low precision replaces."""

    inputs: set[int]
    outputs: set[int]
    supported: bool
    """Every output to convert has a type parameter that allows the low type (or is a Cast/ConstantOfShape)."""
    free: set[int] = dataclasses.field(default_factory=set)
    """Float inputs whose type parameter binds nothing else and allows the low type (``Shape``, ``Cast``): they
    take a low-precision tensor as it is, whatever the node's own precision."""


class _Graph:
    """Index of one graph: element types (by onnx type inference), producers, consumers, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.types = _element_types(model)
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for index, node in enumerate(self.nodes):
            for position, name in enumerate(node.output):
                if name:
                    self.producer[name] = (index, position)
            for position, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((index, position))
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constant_nodes = {node.output[0]: index for index, node in enumerate(self.nodes)
                               if node.op_type == "Constant" and node.domain in ("", "ai.onnx")}
        self.output_names = {o.name for o in self.graph.output}

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == _FLOAT

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            return _constant_node_value(self.nodes[self.constant_nodes[name]])
        return None

    def consumer_nodes(self, name: str) -> list[int]:
        return [index for index, _ in self.consumers.get(name, [])]


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type, by onnx type inference on a skeleton of ``model`` whose large initializers
    carry no data (so a graph of any size fits protobuf's 2 GiB, and ViT-H's weights are not copied)."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(skeleton.graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL and _tensor_bytes(tensor) <= 4096:
            skeleton.graph.initializer.append(tensor)
        else:
            skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _tensor_bytes(tensor: TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
    return None


def _formal(parameters: Sequence[onnx.defs.OpSchema.FormalParameter], position: int) -> str | None:
    """The type string of a node's ``position``-th input or output (the last formal parameter may be variadic)."""
    if position < len(parameters):
        return str(parameters[position].type_str)
    if parameters and parameters[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return str(parameters[-1].type_str)
    return None


def _node_types(graph: _Graph, node: onnx.NodeProto, precision: Precision) -> _NodeTypes:
    """The float32 positions of ``node`` that low precision would change (see :class:`_NodeTypes`)."""
    empty = _NodeTypes(set(), set(), False)
    if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                 for a in node.attribute):
        return empty
    try:
        schema = onnx.defs.get_schema(node.op_type, graph.opset, "")
    except onnx.defs.SchemaError:
        return empty
    low = "tensor(bfloat16)" if precision is Precision.BF16 else "tensor(float16)"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    params = [_formal(schema.inputs, i) for i in range(len(node.input))]
    params += [_formal(schema.outputs, j) for j in range(len(node.output))]
    free = {i for i, name in enumerate(node.input) if graph.is_float(name) and params.count(params[i]) == 1
            and low in allowed.get(str(params[i]), set())}
    float_outputs = {j: _formal(schema.outputs, j) for j, name in enumerate(node.output) if graph.is_float(name)}
    if not float_outputs:
        return _NodeTypes(set(), set(), False, free)
    if node.op_type in ("Cast", "ConstantOfShape"):   # the output type comes from an attribute
        return _NodeTypes(set(), set(float_outputs), low in allowed.get(str(float_outputs.get(0)), set()), free)
    parameters = {param for param in float_outputs.values() if param in allowed}
    inputs = {i for i, name in enumerate(node.input)
              if graph.is_float(name) and _formal(schema.inputs, i) in parameters}
    bound = {_formal(schema.inputs, i) for i in inputs}
    outputs = {j for j, param in float_outputs.items() if param in bound}
    supported = bool(outputs) and outputs == set(float_outputs) and all(low in allowed[str(p)] for p in bound)
    return _NodeTypes(inputs, outputs, supported, free)


def _activation_path(graph: _Graph, types: list[_NodeTypes]) -> set[int]:
    """Nodes with a float path to a float graph output along the positions low precision changes."""
    on_path: set[int] = set()
    constants = set(graph.constant_nodes.values())
    stack = [graph.producer[o.name][0] for o in graph.graph.output
             if graph.is_float(o.name) and o.name in graph.producer]
    while stack:
        index = stack.pop()
        if index in on_path or index in constants:
            continue
        on_path.add(index)
        for position in types[index].inputs:
            producer = graph.producer.get(graph.nodes[index].input[position])
            if producer is not None and producer[1] in types[producer[0]].outputs:
                stack.append(producer[0])
    return on_path


def _single_consumer(graph: _Graph, name: str, op_type: str) -> int | None:
    found = [i for i in graph.consumer_nodes(name) if graph.nodes[i].op_type == op_type]
    return found[0] if len(found) == 1 else None


def _decomposed_layernorms(graph: _Graph) -> Iterator[set[int]]:
    """Node sets of LayerNorm as the exporter decomposes it: ``d = x - ReduceMean(x)``,
    ``d / Sqrt(ReduceMean(Pow(d, 2)) [+ eps])``, then an optional affine ``Mul``/``Add`` by constants."""
    for first, node in enumerate(graph.nodes):
        if node.op_type != "ReduceMean":
            continue
        for sub in graph.consumer_nodes(node.output[0]):
            centered = graph.nodes[sub]
            if centered.op_type != "Sub" or list(centered.input) != [node.input[0], node.output[0]]:
                continue
            power = _single_consumer(graph, centered.output[0], "Pow")
            mean = None if power is None else _single_consumer(graph, graph.nodes[power].output[0], "ReduceMean")
            if power is None or mean is None:
                continue
            group = {first, sub, power, mean}
            tail = graph.nodes[mean].output[0]
            epsilon = _single_consumer(graph, tail, "Add")
            if epsilon is not None:
                group.add(epsilon)
                tail = graph.nodes[epsilon].output[0]
            root = _single_consumer(graph, tail, "Sqrt")
            divide = [i for i in graph.consumer_nodes(centered.output[0]) if graph.nodes[i].op_type == "Div"
                      and root is not None and list(graph.nodes[i].input) == [centered.output[0],
                                                                              graph.nodes[root].output[0]]]
            if root is None or len(divide) != 1:
                continue
            group |= {root, divide[0]}
            tail = graph.nodes[divide[0]].output[0]
            for op_type in ("Mul", "Add"):   # the affine weight and bias
                users = graph.consumer_nodes(tail)
                if len(users) != 1 or graph.nodes[users[0]].op_type != op_type:
                    break
                other = [x for x in graph.nodes[users[0]].input if x != tail]
                if len(other) != 1 or graph.constant_value(other[0]) is None:
                    break
                group.add(users[0])
                tail = graph.nodes[users[0]].output[0]
            yield group


def _ancestors(graph: _Graph, types: list[_NodeTypes], starts: Iterable[int], within: set[int]) -> set[int]:
    """Nodes of ``within`` that feed ``starts`` through the positions low precision changes."""
    found: set[int] = set()
    stack = list(starts)
    while stack:
        index = stack.pop()
        for position in types[index].inputs:
            producer = graph.producer.get(graph.nodes[index].input[position])
            if producer is not None and producer[0] in within and producer[0] not in found:
                found.add(producer[0])
                stack.append(producer[0])
    return found


def _fp32_nodes(graph: _Graph, types: list[_NodeTypes], on_path: set[int], precision: Precision) -> dict[int, str]:
    """Nodes of the activation path kept in fp32 -> the reason (see :class:`MixedPrecisionReport`)."""
    keep: dict[int, str] = {}
    for index in on_path:
        node = graph.nodes[index]
        if not types[index].supported:
            keep[index] = "unsupported-type"
        elif node.op_type in FP32_OPS:
            keep[index] = "op"
        elif node.name.startswith(FP32_SCOPES):
            keep[index] = "scope"
    for group in _decomposed_layernorms(graph):
        for index in group & on_path:
            keep.setdefault(index, "layernorm")
    trig = [i for i in on_path if graph.nodes[i].op_type in TRIG_OPS]
    for index in _ancestors(graph, types, trig, on_path):
        keep.setdefault(index, "trig-argument")
    if precision is Precision.FP16:
        for index in on_path:
            node = graph.nodes[index]
            for position in types[index].inputs:
                value = graph.constant_value(node.input[position])
                if value is not None and value.size and np.any(np.abs(value[np.isfinite(value)]) > FP16_MAX):
                    keep.setdefault(index, "constant-range")
    return keep


def _follow_fp32_consumers(graph: _Graph, types: list[_NodeTypes], low: set[int], keep: dict[int, str]) -> None:
    """Move data-movement nodes (:data:`DATA_MOVEMENT_OPS`) whose outputs only fp32 nodes or graph outputs read
    from ``low`` to ``keep`` (reason ``fp32-consumers``), until nothing changes."""
    changed = True
    while changed:
        changed = False
        for index in sorted(low, reverse=True):
            node = graph.nodes[index]
            if node.op_type not in DATA_MOVEMENT_OPS:
                continue
            wants: set[bool] = set()   # True: a consumer computes in low precision
            for position in types[index].outputs:
                name = node.output[position]
                if name in graph.output_names:
                    wants.add(False)
                for consumer, slot in graph.consumers.get(name, []):
                    if consumer in low and slot in types[consumer].inputs:
                        wants.add(True)
                    elif slot not in types[consumer].free:
                        wants.add(False)
            if wants == {False}:
                low.discard(index)
                keep[index] = "fp32-consumers"
                changed = True


def _low_array(value: np.ndarray, precision: Precision) -> np.ndarray:
    if precision is Precision.FP16:
        return value.astype(np.float16)
    import ml_dtypes  # onnx's own dependency

    return value.astype(ml_dtypes.bfloat16)


class _Rewriter:
    """Builds the mixed graph's node list: low-precision nodes, casts at the boundaries, converted constants."""

    def __init__(self, graph: _Graph, types: list[_NodeTypes], low: set[int], precision: Precision) -> None:
        self.graph, self.types, self.low, self.precision = graph, types, low, precision
        self.low_type = precision.onnx_type
        self.names = {name for node in graph.nodes for name in (*node.input, *node.output, node.name)}
        self.names |= set(graph.initializers) | {i.name for i in graph.graph.input}
        self.dtype = {name: graph.types.get(name, 0) for name in self.names}
        self.casts: dict[tuple[str, int], str] = {}
        self.casts_inserted = 0
        self.initializers_converted = 0
        self.emitted: list[onnx.NodeProto] = []
        self.pending_constants: dict[str, list[onnx.NodeProto]] = {}
        """Constant output -> low copies of it, emitted right after its Constant node."""
        self.low_constants = self._convert_constants()

    def unique(self, base: str) -> str:
        name, count = base, 1
        while name in self.names:
            name, count = f"{base}_{count}", count + 1
        self.names.add(name)
        return name

    def wants_low(self, name: str) -> list[tuple[int, int]]:
        return [(i, p) for i, p in self.graph.consumers.get(name, []) if i in self.low and p in self.types[i].inputs]

    def _convert_constants(self) -> dict[str, str]:
        """Float32 initializers and Constant outputs read by low-precision nodes -> the name of their low copy
        (converted in place when nothing else reads them)."""
        graph, converted = self.graph, {}
        for name in [*graph.initializers, *graph.constant_nodes]:
            original = graph.constant_value(name) if graph.types.get(name) == _FLOAT and self.wants_low(name) else None
            if original is None:   # not float32, read by no low-precision node, or a sparse constant (cast instead)
                continue
            everyone = len(graph.consumers.get(name, [])) + (name in graph.output_names)
            shared = len(self.wants_low(name)) < everyone
            value = _low_array(original, self.precision)
            target = self.unique(f"{name}__{self.precision}") if shared else name
            if name in graph.initializers:
                tensor = numpy_helper.from_array(value, target)
                if shared:
                    graph.graph.initializer.append(tensor)
                else:
                    graph.initializers[name].CopyFrom(tensor)
                self.initializers_converted += 1
            else:
                node = graph.nodes[graph.constant_nodes[name]]
                constant = helper.make_node("Constant", [], [target],
                                            name=self.unique(f"{node.name}__{self.precision}"),
                                            value=numpy_helper.from_array(value, target))
                if shared:
                    self.pending_constants.setdefault(node.output[0], []).append(constant)
                else:
                    node.CopyFrom(constant)
            self.dtype[target] = self.low_type
            converted[name] = target
        return converted

    def cast(self, name: str, to: int) -> str:
        if to == self.low_type and name in self.low_constants:
            return self.low_constants[name]
        key = (name, to)
        if key not in self.casts:
            target = self.unique(f"{name}__{helper.tensor_dtype_to_string(to).removeprefix('TensorProto.').lower()}")
            self.emitted.append(helper.make_node("Cast", [name], [target], name=self.unique(f"{target}/Cast"), to=to))
            self.dtype[target] = to
            self.casts[key] = target
            self.casts_inserted += 1
        return self.casts[key]

    def rewrite(self) -> list[onnx.NodeProto]:
        for index, node in enumerate(self.graph.nodes):
            converted = index in self.low
            for position, name in enumerate(node.input):
                if not name:
                    continue
                have = self.dtype.get(name, 0)
                if converted and position in self.types[index].inputs:
                    want = self.low_type
                elif position in self.types[index].free and have == self.low_type:
                    want = have
                else:
                    want = self.graph.types.get(name, 0)
                if have != want:
                    node.input[position] = self.cast(name, want)
            if converted:
                self._convert_node(node, self.types[index].outputs)
            self.emitted.append(node)
            for output in node.output:
                self.emitted.extend(self.pending_constants.pop(output, []))
        return self.emitted

    def _convert_node(self, node: onnx.NodeProto, outputs: set[int]) -> None:
        for position in outputs:
            self.dtype[node.output[position]] = self.low_type
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float32))))
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                attribute.i = self.low_type
            elif node.op_type == "ConstantOfShape" and attribute.name == "value":
                attribute.t.CopyFrom(numpy_helper.from_array(
                    _low_array(numpy_helper.to_array(attribute.t), self.precision), attribute.t.name))


class ConversionCounts(TypedDict):
    """The figures of :class:`MixedPrecisionReport` that do not depend on files."""

    precision: Precision
    converted_nodes: int
    converted_op_types: Mapping[str, int]
    kept_fp32_op_types: Mapping[str, int]
    kept_fp32_reasons: Mapping[str, int]
    off_path_fp32_nodes: int
    casts_inserted: int
    initializers_converted: int


def convert_model(model: onnx.ModelProto, precision: Precision = Precision.FP16
                  ) -> tuple[onnx.ModelProto, ConversionCounts]:
    """Rewrite ``model`` (fp32, external data loaded) in place into a mixed-precision model (see the module
    docstring); returns it and what was done."""
    precision = Precision(precision)
    graph = _Graph(model)
    types = [_node_types(graph, node, precision) for node in graph.nodes]
    on_path = _activation_path(graph, types)
    keep = _fp32_nodes(graph, types, on_path, precision)
    low = on_path - set(keep)
    _follow_fp32_consumers(graph, types, low, keep)
    off_path = [i for i, node in enumerate(graph.nodes) if i not in on_path and i not in graph.constant_nodes.values()
                and any(graph.is_float(name) for name in node.output)]
    # Graph outputs made in low precision: the producer writes a renamed tensor, a Cast restores name and dtype.
    restored: list[tuple[str, str]] = []
    for output in graph.graph.output:
        producer = graph.producer.get(output.name)
        if producer is not None and producer[0] in low and producer[1] in types[producer[0]].outputs:
            renamed = f"{output.name}__{precision}"
            for index, position in graph.consumers.get(output.name, []):
                graph.nodes[index].input[position] = renamed
            graph.nodes[producer[0]].output[producer[1]] = renamed
            graph.types[renamed] = _FLOAT
            graph.consumers[renamed] = graph.consumers.pop(output.name, [])
            graph.producer[renamed] = graph.producer.pop(output.name)
            restored.append((renamed, output.name))
    rewriter = _Rewriter(graph, types, low, precision)
    nodes = rewriter.rewrite()
    for renamed, name in restored:
        nodes.append(helper.make_node("Cast", [renamed], [name], name=rewriter.unique(f"{name}/Cast"), to=_FLOAT))
        rewriter.casts_inserted += 1
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    del model.graph.value_info[:]   # the source's float32 types, wrong now for the low-precision tensors
    counts: ConversionCounts = {
        "precision": precision,
        "converted_nodes": len(low),
        "converted_op_types": dict(sorted(collections.Counter(graph.nodes[i].op_type for i in low).items())),
        "kept_fp32_op_types": dict(sorted(collections.Counter(graph.nodes[i].op_type for i in keep).items())),
        "kept_fp32_reasons": dict(sorted(collections.Counter(keep.values()).items())),
        "off_path_fp32_nodes": len(off_path),
        "casts_inserted": rewriter.casts_inserted,
        "initializers_converted": rewriter.initializers_converted,
    }
    return model, counts


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def graph_bytes(path: Path) -> int:
    """Size of a graph file with its external data (``<file>.data`` or whatever its tensors name)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer if tensor.data_location == TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def write_mixed_precision(source: Path, destination: Path, precision: Precision = Precision.FP16
                          ) -> MixedPrecisionReport:
    """Write the mixed-precision graph of the fp32 graph ``source`` (external data beside it is read) to
    ``destination``; with external data ``<destination>.data`` when its initializers exceed
    :data:`EXTERNAL_DATA_THRESHOLD_BYTES`. Written into a scratch folder and moved into place, so an interrupted
    run leaves no half-written graph. The result passes onnx's checker (full type inference)."""
    source, destination = Path(source), Path(destination)
    precision = Precision(precision)
    model = onnx.load(str(source), load_external_data=False)
    load_external_data_for_model(model, str(source.parent))
    model, counts = convert_model(model, precision)
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = destination.name + ".data"
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".mixed-precision-") as scratch:
        written = Path(scratch) / destination.name
        if external:
            onnx.save_model(model, str(written), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.chmod(written.with_name(data_name), 0o644)  # readable by a Triton running as another user
        else:
            onnx.save_model(model, str(written))
        del model
        onnx.checker.check_model(str(written), full_check=True)
        if external:
            os.replace(written.with_name(data_name), destination.with_name(data_name))
        else:
            destination.with_name(data_name).unlink(missing_ok=True)
        os.chmod(written, 0o644)
        os.replace(written, destination)
    report = MixedPrecisionReport(
        source=source, destination=destination, source_bytes=graph_bytes(source),
        destination_bytes=graph_bytes(destination), external_data=external, **counts,
    )
    LOG.info("%s", report.summary())
    return report


def write_mixed_precision_model(model_dir: Path, precision: Precision = Precision.FP16) -> list[Path]:
    """Write the mixed-precision encoder and decoder of an export folder (``encoder.onnx`` and ``decoder.onnx``,
    :data:`samserve.model_spec.ENCODER_FILE`, :data:`~samserve.model_spec.DECODER_FILE`) beside them, e.g.
    ``encoder.fp16.onnx``; returns their paths."""
    model_dir = Path(model_dir)
    written = []
    for graph_file in (model_spec.ENCODER_FILE, model_spec.DECODER_FILE):
        destination = model_dir / mixed_precision_file(graph_file, precision)
        write_mixed_precision(model_dir / graph_file, destination, precision)
        written.append(destination)
    return written
