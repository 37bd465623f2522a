"""The gpu-torch target through real Triton and a real gateway, on the CPU: the official PyTorch modules in the
python backend (rendered with ``--device cpu``) serve the same tensors as the cpu-onnxruntime target, and a gateway
serves them without knowing which target runs. In fp32 the two agree to float rounding; bf16 is measured by
bench/gpu.py (on the CPU in `make test`, on a GPU when one is lent)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.triton.models import TritonSam
from samserve.vision.processing import DecoderBatch, prepare_image
from samserve_dev.images import png_bytes, synthetic_image
from samserve_dev.local_stack import serve_locally
from samserve_dev.served_models import TRITON_START_TIMEOUT_S, ServedModel

PROMPTS = [PromptSpec(points=[(80, 60)], labels=[1]), PromptSpec(box=(10, 10, 120, 90), multimask_output=False),
           PromptSpec(points=[(30, 40), (100, 70)], labels=[1, 0])]


@pytest.fixture(scope="module")
def torch_triton(tiny_model, tmp_path_factory) -> Iterator[ServedModel]:
    with serve_locally(tiny_model.directory, tmp_path_factory.mktemp("gpu-torch-on-cpu"), TRITON_START_TIMEOUT_S,
                       target="gpu-torch", checkpoint=tiny_model.checkpoint, instance_kind="KIND_CPU",
                       parameters={"device": "cpu", "precision": "fp32"}) as server:
        yield ServedModel(tiny_model, server)


def _embed_and_decode(url: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    async def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        triton = TritonSam(url, "grpc")
        try:
            meta = await triton.metadata()
            prepared = prepare_image(image, meta.image_size)
            embedding = await triton.encode(prepared)
            staged = await triton.stage(embedding)
            batch = DecoderBatch(  # a point (and its padding token) and a box, in resized-image pixels
                prompt_indices=[0, 1],
                point_coords=np.array([[[40.0, 30.0], [0.0, 0.0]], [[10.0, 10.0], [90.0, 70.0]]], dtype=np.float32),
                point_labels=np.array([[1, -1], [2, 3]], dtype=np.float32),
                mask_input=np.zeros((2, 1, *meta.low_res_mask_size), dtype=np.float32),
                has_mask_input=np.zeros((2,), dtype=np.float32))
            logits, iou = await triton.decode(staged, batch)
            return embedding.array, logits, iou
        finally:
            await triton.close()

    return asyncio.run(run())


def test_gpu_torch_computes_the_tensors_of_the_onnx_target(torch_triton, tiny_triton):
    image = synthetic_image(120, 160, seed=3)
    torch_embedding, torch_logits, torch_iou = _embed_and_decode(torch_triton.url, image)
    onnx_embedding, onnx_logits, onnx_iou = _embed_and_decode(tiny_triton.url, image)
    scale = float(np.abs(onnx_embedding).max())
    assert float(np.abs(torch_embedding - onnx_embedding).max()) <= 1e-4 * scale
    assert float(np.abs(torch_logits - onnx_logits).max()) <= 1e-3 * float(np.abs(onnx_logits).max())
    np.testing.assert_allclose(torch_iou, onnx_iou, atol=1e-4)
    agree = (torch_logits > 0) == (onnx_logits > 0)
    assert agree.mean() >= 0.999 and (onnx_logits > 0).any() and (onnx_logits <= 0).any()


def test_a_gateway_serves_the_gpu_torch_target_unchanged(torch_triton, gateway, gateway_factory):
    torch_gateway = gateway_factory(torch_triton.url, None)
    data = png_bytes(synthetic_image(120, 160, seed=4))
    with SamServeClient(torch_gateway.target) as client:
        on_torch = client.segment(data, PROMPTS)
    with SamServeClient(gateway.target) as client:
        on_onnx = client.segment(data, PROMPTS)
    for a, b in zip(on_torch, on_onnx, strict=True):
        assert a.token_index == b.token_index
        union = np.logical_or(a.masks, b.masks).sum()
        assert union > 0  # never 0 masks against 0 masks
        assert np.logical_and(a.masks, b.masks).sum() / union >= 0.99
        np.testing.assert_allclose(a.predicted_iou, b.predicted_iou, atol=1e-3)
