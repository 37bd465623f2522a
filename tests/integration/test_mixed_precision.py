"""The mixed-precision pass (``samserve_build.precision``): fp16 graphs against the fp32 graphs they come from.

* The pass itself (tiny random weights, fp16 and bf16): graph inputs and outputs keep names, dtypes and shapes;
  LayerNorm (node or decomposed), Softmax and the encoder's neck stay fp32 while the matrix products go low
  precision; weights are stored in low precision (vit_b's fp16 encoder is about half the size); external data
  is read and written; a small hand-made graph covers what the exports do not (a graph output read inside the
  graph, a constant beyond fp16's range, a constant shared by fp16 and fp32 nodes).
* Masks, with ONNX Runtime on the CPU and the service's pre- and post-processing (ONNX Runtime computes most fp16
  nodes in fp32 behind casts, so this catches fp16 storage rounding and overflow, see the module's docstring):
  seeded random vit_b weights on synthetic images, every prompt's masks against the fp32 graphs' masks (IoU);
  the shipped scenes model on the 500 held-out scenes of ``samserve_build.evaluation`` (mIoU drop).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve_build import export, graph_quality, precision
from samserve_build.precision import Precision, graph_io
from samserve_dev.mixed_precision import linked_export, vit_b_inputs

FP32_ALWAYS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")
NECK = "/image_encoder/neck/"


def element_types(path: Path) -> dict[str, int]:
    """Tensor name -> element type of a graph (onnx type inference)."""
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def float_types(types: dict[str, int], node: onnx.NodeProto) -> set[int]:
    """Element types of a node's float tensors."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return {types[name] for name in (*node.input, *node.output) if name and types.get(name) in floats}


def interface(path: Path) -> list[tuple[str, str, int, list[str]]]:
    """(direction, name, element type, dims) of every graph input and output."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(direction, v.name, v.type.tensor_type.elem_type,
             [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim])
            for direction, values in (("input", graph.input), ("output", graph.output)) for v in values]


@pytest.fixture(scope="module")
def tiny_mixed(tiny_model, tmp_path_factory) -> tuple[Path, dict[Precision, list[precision.MixedPrecisionReport]]]:
    folder = linked_export(tiny_model.directory, tmp_path_factory.mktemp("tiny-mixed"))
    reports = {p: [precision.write_mixed_precision(folder / name, folder / precision.mixed_precision_file(name, p), p)
                   for name in (model_spec.ENCODER_FILE, model_spec.DECODER_FILE)] for p in Precision}
    return folder, reports


def test_mixed_precision_file_names() -> None:
    assert precision.mixed_precision_file("encoder.onnx", Precision.FP16) == "encoder.fp16.onnx"
    assert precision.mixed_precision_file("decoder.onnx", Precision.BF16) == "decoder.bf16.onnx"
    assert precision.mixed_precision_file("models/encoder.onnx", Precision.FP16) == "models/encoder.fp16.onnx"
    with pytest.raises(ValueError):
        precision.mixed_precision_file("encoder.pt", Precision.FP16)


@pytest.mark.parametrize("low", list(Precision))
def test_interface_kept_and_sensitive_ops_fp32(tiny_mixed, low: Precision) -> None:
    folder, reports = tiny_mixed
    low_type = low.onnx_type
    for graph_file, report in zip((model_spec.ENCODER_FILE, model_spec.DECODER_FILE), reports[low], strict=True):
        source, mixed = folder / graph_file, folder / precision.mixed_precision_file(graph_file, low)
        assert report.destination == mixed
        assert interface(mixed) == interface(source)   # names, dtypes (uint8, int64, float32) and dynamic axes
        assert report.source_bytes == source.stat().st_size and report.destination_bytes == mixed.stat().st_size
        # float32 weights shrink to half, except those of the neck and the norms (20 % of this tiny encoder's), and
        # in bf16 the convolutions' (opset 17's Conv has no bf16)
        assert report.destination_bytes < (0.75 if low is Precision.FP16 else 0.8) * report.source_bytes
        assert not report.external_data
        types = element_types(mixed)
        graph = onnx.load(str(mixed)).graph
        nodes = graph.node
        sensitive = [n for n in nodes if n.op_type in FP32_ALWAYS or n.name.startswith(NECK)]
        assert {n.op_type for n in sensitive} >= {"LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"}
        for node in sensitive:
            assert float_types(types, node) == {onnx.TensorProto.FLOAT}, (node.name, float_types(types, node))
        # a weight left in float32 is read by fp32 nodes only (the neck's)
        fp32_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1}
        assert all(float_types(types, n) == {onnx.TensorProto.FLOAT} for n in nodes if fp32_weights & set(n.input))
        # no value goes through low precision and straight back (a float Cast of a float Cast)
        float_casts = {n.output[0] for n in nodes if n.op_type == "Cast" and float_types(types, n)}
        assert not [n.name for n in nodes if n.output[0] in float_casts and n.input[0] in float_casts]
        products = [n for n in nodes if n.op_type in ("MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose")
                    and not n.name.startswith(NECK)]
        converted = [n for n in products if float_types(types, n) == {low_type}]
        # all of them but the positional encoding's (fp16); bf16 at opset 17 has no Conv, ConvTranspose or Einsum
        assert len(converted) >= (0.9 if low is Precision.FP16 else 0.6) * len(products), (len(converted), report)
        assert report.converted_nodes > 80 and report.casts_inserted > 0 and report.initializers_converted > 10
        assert {"LayerNormalization", "Softmax"} <= set(report.kept_fp32_op_types)
    encoder, decoder = reports[low]
    assert encoder.kept_fp32_reasons["scope"] >= 4   # the neck: 2 convs, 2 decomposed LayerNorm2d
    assert decoder.kept_fp32_reasons["layernorm"] >= 7   # LayerNorm2d (decomposed) in the mask path
    assert decoder.kept_fp32_op_types["Sin"] == decoder.kept_fp32_op_types["Cos"] >= 1


def test_small_graph_edge_cases(tmp_path) -> None:
    """What the exported graphs do not all show: a graph output made in fp16 and read inside the graph, ``Shape``
    of an fp16 tensor (no cast), ``ConstantOfShape`` without a value, a constant beyond fp16's range, a constant
    read by fp16 and fp32 nodes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "weight")
    huge = numpy_helper.from_array(np.array(1e5, dtype=np.float32), "huge")
    shared = helper.make_node("Constant", [], ["shared"], value=numpy_helper.from_array(np.array(0.5, np.float32)))
    nodes = [
        shared,
        helper.make_node("MatMul", ["x", "weight"], ["h"]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Add", ["h", "zeros"], ["a"]),
        helper.make_node("Relu", ["a"], ["relu"]),               # a graph output, read below too
        helper.make_node("Mul", ["relu", "shared"], ["half"]),   # fp16, reads the shared constant
        helper.make_node("Softmax", ["half"], ["p"]),            # fp32
        helper.make_node("Pow", ["p", "shared"], ["root"]),      # fp32: reads the shared constant in fp32
        helper.make_node("Div", ["root", "huge"], ["small"]),    # fp32: 1e5 is beyond fp16
        helper.make_node("Add", ["small", "relu"], ["y"]),
    ]
    values = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 8]) for name in ("x", "y", "relu")}
    graph = helper.make_graph(nodes, "edges", [values["x"]], [values["y"], values["relu"]], [weight, huge])
    source = tmp_path / "edges.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    report = precision.write_mixed_precision(source, tmp_path / "edges.fp16.onnx")
    assert interface(report.destination) == interface(source)
    assert report.kept_fp32_reasons == {"constant-range": 1, "op": 2}, report
    assert report.initializers_converted == 1   # the weight; 'huge' stays float32, 'shared' gets an fp16 copy
    mixed = onnx.load(str(report.destination))
    types = element_types(report.destination)
    assert not any(n.op_type == "Cast" and n.output[0] in {i for m in mixed.graph.node if m.op_type == "Shape"
                                                           for i in m.input} for n in mixed.graph.node)
    assert types["h"] == types["zeros"] == types["relu__fp16"] == TensorProto.FLOAT16
    assert types["p"] == types["small"] == types["shared"] == TensorProto.FLOAT
    assert types["shared__fp16"] == TensorProto.FLOAT16
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    expected = onnx_runner.run(onnx_runner.create_session(source), feeds)
    got = onnx_runner.run(onnx_runner.create_session(report.destination), feeds)
    for name in ("y", "relu"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected[name], rtol=5e-3, atol=5e-3)


def test_mixed_graphs_run_close_to_fp32(tiny_mixed, tiny_model) -> None:
    """ONNX Runtime runs the fp16 graphs; outputs keep dtype and shape and stay near the fp32 ones."""
    folder, _ = tiny_mixed
    meta = tiny_model.metadata
    rng = np.random.default_rng(5)
    for graph_file, feeds in ((model_spec.ENCODER_FILE, export.encoder_inputs(meta, 2, rng)),
                              (model_spec.DECODER_FILE, export.decoder_inputs(meta, 3, 2, rng))):
        reference = onnx_runner.run(onnx_runner.create_session(folder / graph_file), feeds)
        mixed_file = folder / precision.mixed_precision_file(graph_file, Precision.FP16)
        mixed = onnx_runner.run(onnx_runner.create_session(mixed_file), feeds)
        for name, expected in reference.items():
            assert mixed[name].dtype == np.float32 and mixed[name].shape == expected.shape
            assert np.isfinite(mixed[name]).all()
            assert export.relative_error(mixed[name], expected) < 0.02, (graph_file, name)


def test_external_data_in_and_out(tiny_model, tmp_path, monkeypatch) -> None:
    """A source with external data (as ViT-H's encoder) is read; a result above the threshold is written with
    ``<file>.data`` beside it and equals the one-file result."""
    source = tmp_path / model_spec.ENCODER_FILE
    onnx.save_model(onnx.load(str(tiny_model.directory / model_spec.ENCODER_FILE)), str(source),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="encoder.onnx.data",
                    size_threshold=1024)
    single = precision.write_mixed_precision(tiny_model.directory / model_spec.ENCODER_FILE,
                                             tmp_path / "single.fp16.onnx")
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)  # where write_mixed_precision reads it
    split = precision.write_mixed_precision(source, tmp_path / "encoder.fp16.onnx")
    data = tmp_path / "encoder.fp16.onnx.data"
    assert split.external_data and not single.external_data and data.stat().st_size > split.destination.stat().st_size
    assert split.destination_bytes == split.destination.stat().st_size + data.stat().st_size
    assert split.source_bytes == source.stat().st_size + (tmp_path / "encoder.onnx.data").stat().st_size
    feeds = export.encoder_inputs(tiny_model.metadata, 1, np.random.default_rng(1))
    outputs = [onnx_runner.run(onnx_runner.create_session(path), feeds)[model_spec.ENC_EMBEDDING]
               for path in (single.destination, split.destination)]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.slow
def test_vit_b_masks_agree(vit_b_model, tmp_path) -> None:
    """Seeded random vit_b weights: every prompt's masks (upscaled and thresholded as the service does) of the fp16
    graphs against those of the fp32 graphs."""
    folder = linked_export(vit_b_model.directory, tmp_path / "vit_b")
    encoder, _ = precision.write_mixed_precision_model(folder, Precision.FP16)
    assert encoder.stat().st_size < 0.55 * (folder / model_spec.ENCODER_FILE).stat().st_size
    images, prompts = vit_b_inputs()
    agreement = graph_quality.mask_agreement(graph_quality.OnnxSam.of_model(folder),
                                         graph_quality.OnnxSam.of_model(folder, Precision.FP16), images, prompts)
    summary = agreement.summary()
    print("vit_b fp16 vs fp32", summary)
    assert summary["prompts"] >= graph_quality.MIN_PROMPTS, summary
    assert summary["min_iou"] >= graph_quality.MIN_IOU and summary["median_iou"] >= graph_quality.MEDIAN_IOU, summary


def test_scenes_miou_drop(scenes_model, tmp_path) -> None:
    """The shipped model on the 500 held-out scenes (point top-ranked and box): the fp16 graphs lose at most
    MIOU_DROP_LIMIT of mIoU against the fp32 graphs, both through ONNX Runtime with the same processing."""
    folder = linked_export(scenes_model.directory, tmp_path / "scenes")
    precision.write_mixed_precision_model(folder, Precision.FP16)
    graphs = {"fp32": graph_quality.OnnxSam.of_model(folder, intra_op_threads=1),
              "fp16": graph_quality.OnnxSam.of_model(folder, Precision.FP16, intra_op_threads=1)}
    results = graph_quality.scenes_quality(graphs, graph_quality.SCENES, workers=os.cpu_count() or 1)
    reference, mixed = results["fp32"].summary(), results["fp16"].summary()
    print("scenes fp32", reference, "fp16", mixed)
    assert reference["objects"] == mixed["objects"] > 1000
    assert reference["miou_point_top"] > 0.45 and reference["miou_box"] > 0.6   # the model is worth measuring
    for metric in ("miou_point_top", "miou_box"):
        assert reference[metric] - mixed[metric] <= graph_quality.MIOU_DROP_LIMIT, (metric, reference, mixed)
