"""The CPU serving targets beside cpu-onnxruntime (``samserve_build.targets.CPU_TARGETS``) and ``auto``'s choice.

* cpu-openvino (OpenVINO, fp32) computes the tensors of ONNX Runtime to float rounding, in-process with the same
  runners as Triton's python backend.
* cpu-openvino-bf16 through real Triton and a real gateway: the served metadata says bf16 (so its embeddings never
  share a cache entry with fp32 ones) and the gateway's masks match the fp32 stack's.
* The mask gates of reduced precision (cpu-openvino-bf16: OpenVINO's encoder in bf16, its decoder in fp32, against
  the fp32 graphs in ONNX Runtime, the service's processing): seeded random vit_b weights, every prompt's IoU
  >= MIN_IOU and their median >= MEDIAN_IOU; the shipped scenes model on the 500 held-out scenes, mIoU (point and
  box) drops <= MIOU_DROP_LIMIT. They run on every CPU: where it has no native bf16 (OpenVINO would quietly compute
  fp32 there), on the emulation of the encoder's bf16 arithmetic in ONNX Runtime
  (``OnnxSam.bf16_as_gated``); where it has, a test also checks that emulation against OpenVINO's own bf16.
* ``auto`` calibrates once, caches its choice and serves it through Triton.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core import model_spec
from samserve.triton.models import TritonSam
from samserve_build import cpu_choice, export, graph_quality
from samserve_build.targets import SERVING_TARGETS, ServingTargetName, composed
from samserve_dev.images import png_bytes, synthetic_image
from samserve_dev.local_stack import serve_locally
from samserve_dev.mixed_precision import vit_b_inputs
from samserve_dev.served_models import TRITON_START_TIMEOUT_S, ServedModel

BF16 = ServingTargetName.CPU_OPENVINO_BF16
NATIVE_BF16 = bool(set(SERVING_TARGETS[BF16].native_flags) & set(cpu_choice.Cpu.detect().flags))
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX-512-bf16 or AMX)")
PROMPTS = [PromptSpec(points=[(80, 60)], labels=[1]), PromptSpec(box=(10, 10, 120, 90), multimask_output=False),
           PromptSpec(points=[(30, 40), (100, 70)], labels=[1, 0])]


@pytest.fixture(scope="module")
def bf16_triton(tiny_model, tmp_path_factory) -> Iterator[ServedModel]:
    with serve_locally(tiny_model.directory, tmp_path_factory.mktemp("cpu-openvino-bf16"), TRITON_START_TIMEOUT_S,
                       target=BF16) as server:
        yield ServedModel(tiny_model, server)


def test_openvino_fp32_computes_the_tensors_of_onnx_runtime(tiny_model) -> None:
    rng = np.random.default_rng(2)
    meta = tiny_model.metadata
    onnx = graph_quality.OnnxSam.of_target(tiny_model.directory, ServingTargetName.CPU_ONNXRUNTIME)
    openvino = graph_quality.OnnxSam.of_target(tiny_model.directory, ServingTargetName.CPU_OPENVINO)
    for runner, reference, feeds in ((openvino.encoder, onnx.encoder, export.encoder_inputs(meta, 2, rng)),
                                     (openvino.decoder, onnx.decoder, export.decoder_inputs(meta, 5, 3, rng))):
        got, expected = runner.run(feeds), reference.run(feeds)
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert got[name].dtype == np.float32 and got[name].shape == value.shape
            assert export.relative_error(got[name], value) <= export.RELATIVE_TOLERANCE, name


def _embed(url: str, image: np.ndarray) -> tuple[model_spec.ModelMetadata, np.ndarray]:
    from samserve.vision.processing import prepare_image

    async def run() -> tuple[model_spec.ModelMetadata, np.ndarray]:
        triton = TritonSam(url, "grpc")
        try:
            meta = await triton.metadata()
            return meta, (await triton.encode(prepare_image(image, meta.image_size))).array
        finally:
            await triton.close()

    return asyncio.run(run())


def test_a_gateway_serves_openvino_bf16_apart_from_fp32(bf16_triton, tiny_triton, gateway, gateway_factory) -> None:
    image = synthetic_image(120, 160, seed=4)
    bf16_meta, bf16_embedding = _embed(bf16_triton.url, image)
    fp32_meta, fp32_embedding = _embed(tiny_triton.url, image)
    assert (bf16_meta.precision, fp32_meta.precision) == ("bf16", "fp32")
    assert bf16_meta.cache_namespace != fp32_meta.cache_namespace   # a bf16 embedding is never served as fp32
    assert export.relative_error(bf16_embedding, fp32_embedding) < 0.05
    bf16_gateway = gateway_factory(bf16_triton.url, None)
    data = png_bytes(image)
    with SamServeClient(bf16_gateway.target) as client:
        on_bf16 = client.segment(data, PROMPTS)
    with SamServeClient(gateway.target) as client:
        on_fp32 = client.segment(data, PROMPTS)
    for a, b in zip(on_bf16, on_fp32, strict=True):
        union = np.logical_or(a.masks, b.masks).sum()
        assert union > 0  # never 0 masks against 0 masks
        assert np.logical_and(a.masks, b.masks).sum() / union >= graph_quality.MIN_IOU


@pytest.mark.slow
def test_vit_b_bf16_masks_agree(vit_b_model) -> None:
    """Seeded random vit_b weights: every prompt's masks of cpu-openvino-bf16 (or its emulation) against the fp32
    graphs in ONNX Runtime. (The decoder in bf16 too failed this gate: median IoU 0.9895.)"""
    images, prompts = vit_b_inputs()
    reduced, how = graph_quality.OnnxSam.bf16_as_gated(vit_b_model.directory)
    agreement = graph_quality.mask_agreement(
        graph_quality.OnnxSam.of_target(vit_b_model.directory, ServingTargetName.CPU_ONNXRUNTIME), reduced, images,
        prompts)
    summary = agreement.summary()
    print(f"vit_b bf16 ({how}) vs fp32", summary)
    assert summary["prompts"] >= graph_quality.MIN_PROMPTS, summary
    assert summary["min_iou"] >= graph_quality.MIN_IOU and summary["median_iou"] >= graph_quality.MEDIAN_IOU, summary


def test_scenes_bf16_miou_drop(scenes_model) -> None:
    """The shipped model on the 500 held-out scenes: cpu-openvino-bf16 (or its emulation) loses at most
    MIOU_DROP_LIMIT of mIoU (point top-ranked and box) against the fp32 graphs in ONNX Runtime, with the same
    processing."""
    bf16, how = graph_quality.OnnxSam.bf16_as_gated(scenes_model.directory, 1)
    graphs = {"fp32": graph_quality.OnnxSam.of_target(scenes_model.directory, ServingTargetName.CPU_ONNXRUNTIME, 1),
              "bf16": bf16}
    results = graph_quality.scenes_quality(graphs, graph_quality.SCENES, workers=os.cpu_count() or 1)
    reference, reduced = results["fp32"].summary(), results["bf16"].summary()
    print("scenes fp32", reference, f"bf16 ({how})", reduced)
    assert reference["objects"] == reduced["objects"] > 1000
    assert reference["miou_point_top"] > 0.45 and reference["miou_box"] > 0.6   # the model is worth measuring
    for metric in ("miou_point_top", "miou_box"):
        assert reference[metric] - reduced[metric] <= graph_quality.MIOU_DROP_LIMIT, (metric, reference, reduced)


@needs_native_bf16
def test_the_bf16_emulation_tracks_openvinos_bf16(scenes_model, tmp_path) -> None:
    """Where OpenVINO computes bf16 natively, the emulation the gates use elsewhere gives nearly its masks: the
    emulation is a stand-in for the served arithmetic, not for fp32 (the shipped model, 40 held-out scenes)."""
    from samserve_build.precision import emulation

    model_dir = tmp_path / "model"
    shutil.copytree(scenes_model.directory, model_dir)
    emulation.write_bf16_emulation(model_dir / model_spec.ENCODER_FILE,
                                   model_dir / emulation.emulation_file(model_spec.ENCODER_FILE))
    native, how = graph_quality.OnnxSam.bf16_as_gated(model_dir, 1)
    assert how == "openvino"
    parameters = {"intra_op_threads": "1"}
    emulated = graph_quality.OnnxSam(
        graph_quality.OnnxRunner(model_dir / emulation.emulation_file(model_spec.ENCODER_FILE), parameters),
        graph_quality.OnnxRunner(model_dir / model_spec.DECODER_FILE, parameters), native.meta)
    fp32 = graph_quality.OnnxSam.of_target(model_dir, ServingTargetName.CPU_ONNXRUNTIME, 1)
    results = graph_quality.scenes_quality({"fp32": fp32, "openvino": native, "emulated": emulated},
                                           graph_quality.SCENES[:40], workers=os.cpu_count() or 1)
    summaries = {name: result.summary() for name, result in results.items()}
    print(summaries)
    for metric in ("miou_point_top", "miou_box"):
        assert abs(summaries["emulated"][metric] - summaries["openvino"][metric]) <= graph_quality.MIOU_DROP_LIMIT


def test_auto_calibrates_once_and_serves_its_choice(tiny_model, tmp_path, caplog) -> None:
    """``auto`` on the tiny model: every candidate this CPU runs natively is timed, the choice is cached with the CPU
    and reused, and the repository it renders serves through Triton (a composed one when the fastest encoder and
    decoder come from different targets)."""
    caplog.set_level("INFO", logger="samserve_build.cpu_choice")
    chosen = cpu_choice.resolve(tiny_model.directory, tmp_path)
    cpu = cpu_choice.Cpu.detect()
    components = chosen.components or dict.fromkeys(chosen.model_files, chosen.name)
    assert set(components.values()) <= set(cpu_choice.candidates(cpu))
    encoder, decoder = components[model_spec.ENCODER_MODEL], components[model_spec.DECODER_MODEL]
    assert "calibrating" in caplog.text and f"auto: encoder as {encoder}, decoder as {decoder} on {cpu.model}" in \
        caplog.text
    caplog.clear()
    assert cpu_choice.resolve(tiny_model.directory, tmp_path) == chosen
    assert "calibrating" not in caplog.text and f"auto: encoder as {encoder}" in caplog.text
    with serve_locally(tiny_model.directory, tmp_path / "served", TRITON_START_TIMEOUT_S, target=chosen) as server:
        meta, embedding = _embed(server.grpc_url, synthetic_image(60, 80, seed=1))
    assert embedding.shape[-3:] == tuple(meta.embedding_shape) and np.isfinite(embedding).all()


def test_a_composed_target_serves_each_model_as_its_target(tiny_model, tmp_path) -> None:
    """The bf16 encoder of cpu-openvino-bf16 with the decoder of cpu-onnxruntime, rendered and served by Triton."""
    mixed = composed(BF16, ServingTargetName.CPU_ONNXRUNTIME)
    with serve_locally(tiny_model.directory, tmp_path / "served", TRITON_START_TIMEOUT_S, target=mixed) as server:
        meta, embedding = _embed(server.grpc_url, synthetic_image(60, 80, seed=1))
    assert meta.precision == "bf16" and np.isfinite(embedding).all()
    repository = tmp_path / "served" / "repository"
    decoder_config = (repository / model_spec.DECODER_MODEL / "config.pbtxt").read_text()
    assert '"onnxruntime"' not in decoder_config and "execution_providers" in decoder_config   # ONNX Runtime's
    assert (repository / model_spec.DECODER_MODEL / "1" / model_spec.DECODER_NO_MASK_FILE).exists()
    assert '"openvino"' in (repository / model_spec.ENCODER_MODEL / "config.pbtxt").read_text()
