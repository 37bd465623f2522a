"""Which nodes of an fp32 graph may compute in low precision: the graph indexed (types by onnx inference, producers,
consumers, constants), each node's float positions, the activation path, and the nodes kept in fp32 with the reason
(see :mod:`samserve_build.precision`)."""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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
FLOAT = TensorProto.FLOAT


@dataclasses.dataclass
class NodeTypes:
    """Which input and output positions of a node carry the float32 type parameter that low precision replaces."""

    inputs: set[int]
    outputs: set[int]
    supported: bool
    """Every output to convert has a type parameter that allows the low type (or is a Cast/ConstantOfShape)."""
    free: set[int] = dataclasses.field(default_factory=set)
    """Float inputs whose type parameter binds nothing else and allows the low type (``Shape``, ``Cast``): they
    take a low-precision tensor as it is, whatever the node's own precision."""


class Graph:
    """Index of one graph: element types (by onnx type inference), producers, consumers, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.types = element_types(model)
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
        return bool(name) and self.types.get(name) == FLOAT

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            return _constant_node_value(self.nodes[self.constant_nodes[name]])
        return None

    def consumer_nodes(self, name: str) -> list[int]:
        return [index for index, _ in self.consumers.get(name, [])]


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type, by onnx type inference on a skeleton of ``model`` whose large initializers
    carry no data (so a graph of any size fits protobuf's 2 GiB, and ViT-H's weights are not copied)."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(skeleton.graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL and tensor_bytes(tensor) <= 4096:
            skeleton.graph.initializer.append(tensor)
        else:
            skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def tensor_bytes(tensor: TensorProto) -> int:
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


def node_types(graph: Graph, node: onnx.NodeProto, precision: Precision) -> NodeTypes:
    """The float32 positions of ``node`` that low precision would change (see :class:`NodeTypes`)."""
    empty = NodeTypes(set(), set(), False)
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
        return NodeTypes(set(), set(), False, free)
    if node.op_type in ("Cast", "ConstantOfShape"):   # the output type comes from an attribute
        return NodeTypes(set(), set(float_outputs), low in allowed.get(str(float_outputs.get(0)), set()), free)
    parameters = {param for param in float_outputs.values() if param in allowed}
    inputs = {i for i, name in enumerate(node.input)
              if graph.is_float(name) and _formal(schema.inputs, i) in parameters}
    bound = {_formal(schema.inputs, i) for i in inputs}
    outputs = {j for j, param in float_outputs.items() if param in bound}
    supported = bool(outputs) and outputs == set(float_outputs) and all(low in allowed[str(p)] for p in bound)
    return NodeTypes(inputs, outputs, supported, free)


def activation_path(graph: Graph, types: list[NodeTypes]) -> set[int]:
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


def _single_consumer(graph: Graph, name: str, op_type: str) -> int | None:
    found = [i for i in graph.consumer_nodes(name) if graph.nodes[i].op_type == op_type]
    return found[0] if len(found) == 1 else None


def _decomposed_layernorms(graph: Graph) -> Iterator[set[int]]:
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


def _ancestors(graph: Graph, types: list[NodeTypes], starts: Iterable[int], within: set[int]) -> set[int]:
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


def fp32_nodes(graph: Graph, types: list[NodeTypes], on_path: set[int], precision: Precision) -> dict[int, str]:
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


def follow_fp32_consumers(graph: Graph, types: list[NodeTypes], low: set[int], keep: dict[int, str]) -> None:
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
