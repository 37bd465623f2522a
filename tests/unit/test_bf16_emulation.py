"""The bf16 emulation of the reduced-precision gates (samserve_build.precision.emulation): the operands and results
of matrix products rounded to bf16, everything else untouched, in a graph ONNX Runtime runs on any CPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from samserve_build.precision import emulation


def _graph(weight: np.ndarray) -> onnx.ModelProto:
    """y = relu(x @ W + 1): a MatMul (emulated), an Add and a Relu (untouched)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "one"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def bf16(values: np.ndarray) -> np.ndarray:
    return values.astype(ml_dtypes.bfloat16).astype(np.float32)


def test_matrix_products_see_bf16_operands_and_results_and_nothing_else_changes():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 2)).astype(np.float32) * 1.2345
    x = rng.normal(size=(2, 3)).astype(np.float32) * 3.21
    model, count = emulation.emulate_bf16(_graph(weight))
    onnx.checker.check_model(model, full_check=True)
    assert count == 1
    got = _run(model, x)
    expected = np.maximum(bf16(bf16(x) @ bf16(weight)) + 1, 0)  # products of bf16 operands, a bf16 result
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    exact = np.maximum(x @ weight + 1, 0)
    assert np.abs(got - exact).max() > 1e-3  # bf16 (8 significant bits) visibly differs from fp32
    graph_io = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    assert graph_io == (["x"], ["y"])  # the interface is the fp32 graph's


def test_the_file_is_written_beside_its_source(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    source = tmp_path / "encoder.onnx"
    onnx.save_model(_graph(weight), str(source))
    written = emulation.write_bf16_emulation(source)
    assert written == tmp_path / "encoder.bf16emu.onnx"
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(written)).graph.initializer}
    np.testing.assert_array_equal(stored["W"], bf16(weight))  # weights rounded once, in the file
    np.testing.assert_array_equal(stored["one"], np.ones(1, np.float32))  # not an operand of a product: kept
