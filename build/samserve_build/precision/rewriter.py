"""The mixed graph written: low-precision nodes, casts at the boundaries, constants converted, graph outputs restored
to float32 (:func:`convert_model`)."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import TypedDict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from samserve_build.precision.analysis import (
    FLOAT,
    Graph,
    NodeTypes,
    Precision,
    activation_path,
    follow_fp32_consumers,
    fp32_nodes,
    node_types,
)


def _low_array(value: np.ndarray, precision: Precision) -> np.ndarray:
    if precision is Precision.FP16:
        return value.astype(np.float16)
    import ml_dtypes  # onnx's own dependency

    return value.astype(ml_dtypes.bfloat16)


class Rewriter:
    """Builds the mixed graph's node list: low-precision nodes, casts at the boundaries, converted constants."""

    def __init__(self, graph: Graph, types: list[NodeTypes], low: set[int], precision: Precision) -> None:
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
            original = graph.constant_value(name) if graph.types.get(name) == FLOAT and self.wants_low(name) else None
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
    graph = Graph(model)
    types = [node_types(graph, node, precision) for node in graph.nodes]
    on_path = activation_path(graph, types)
    keep = fp32_nodes(graph, types, on_path, precision)
    low = on_path - set(keep)
    follow_fp32_consumers(graph, types, low, keep)
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
            graph.types[renamed] = FLOAT
            graph.consumers[renamed] = graph.consumers.pop(output.name, [])
            graph.producer[renamed] = graph.producer.pop(output.name)
            restored.append((renamed, output.name))
    rewriter = Rewriter(graph, types, low, precision)
    nodes = rewriter.rewrite()
    for renamed, name in restored:
        nodes.append(helper.make_node("Cast", [renamed], [name], name=rewriter.unique(f"{name}/Cast"), to=FLOAT))
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
