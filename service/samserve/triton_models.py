"""Async client of the ``sam_encoder`` and ``sam_decoder`` Triton models (tensor contract: model_spec)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import np_to_triton_dtype

from samserve import model_spec
from samserve.processing import DecoderBatch, PreparedImage


class ModelMismatchError(RuntimeError):
    """Encoder and decoder in Triton were exported from different models."""


def _input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


class TritonSam:
    """Encoder and decoder calls on one Triton server (gRPC)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)

    async def metadata(self) -> model_spec.ModelMetadata:
        """The served model's metadata, read from both model configs; they must agree."""
        found = []
        for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
            config = await self.client.get_model_config(model, as_json=True)
            raw = config["config"]["parameters"][model_spec.METADATA_PARAMETER]["string_value"]
            found.append(model_spec.ModelMetadata.from_json(raw))
        if found[0] != found[1]:
            raise ModelMismatchError(f"encoder {found[0].model_id} and decoder {found[1].model_id} differ")
        return found[0]

    async def encode(self, image: PreparedImage) -> np.ndarray:
        """The embedding of one prepared image: float32, C x h x w."""
        inputs = [
            _input(model_spec.ENC_IMAGE, image.padded[None]),
            _input(model_spec.ENC_INPUT_SIZE, np.asarray([image.input_size], dtype=np.int64)),
        ]
        outputs = [grpcclient.InferRequestedOutput(model_spec.ENC_EMBEDDING)]
        result = await self.client.infer(model_spec.ENCODER_MODEL, inputs, outputs=outputs)
        return result.as_numpy(model_spec.ENC_EMBEDDING)[0]

    async def decode(self, embedding: np.ndarray, batch: DecoderBatch) -> tuple[np.ndarray, np.ndarray]:
        """Decode N prompts of one image.

        ``embedding``: float32 C x h x w. Returns (low-res logits float32 N x M x 4h x 4w, IoU float32 N x M).
        """
        inputs = [
            _input(model_spec.DEC_EMBEDDING, embedding[None]),
            _input(model_spec.DEC_POINT_COORDS, batch.point_coords[None]),
            _input(model_spec.DEC_POINT_LABELS, batch.point_labels[None]),
            _input(model_spec.DEC_MASK_INPUT, batch.mask_input[None]),
            _input(model_spec.DEC_HAS_MASK_INPUT, batch.has_mask_input[None]),
        ]
        outputs = [grpcclient.InferRequestedOutput(name) for name in model_spec.DECODER_OUTPUTS]
        result = await self.client.infer(model_spec.DECODER_MODEL, inputs, outputs=outputs)
        return result.as_numpy(model_spec.DEC_LOW_RES_MASKS)[0], result.as_numpy(model_spec.DEC_IOU_PREDICTIONS)[0]

    async def inference_count(self, model: str) -> int:
        """How many inferences Triton has run for ``model`` (its own statistics)."""
        stats = await self.client.get_inference_statistics(model, as_json=True)
        return sum(int(entry.get("inference_count", 0)) for entry in stats.get("model_stats", []))

    async def close(self) -> None:
        await self.client.close()
