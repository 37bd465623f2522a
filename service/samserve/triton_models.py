"""Async client of the ``sam_encoder`` and ``sam_decoder`` Triton models (tensor contract: model_spec).

Embedding transport: every decoder call needs the image embedding (4 MiB in fp32 for the released models).
``shm`` stages it once in a Triton system shared-memory region that later decoder calls reference by name
(gateway and Triton on one host); ``grpc`` sends it inside every request. Measured on the 2-core CPU with vit_b
(bench/results/models_cpu.json): shm saves 4-9 ms per decoder call, so it is the default where possible.
With ``shm`` the decoder's outputs come back through shared memory too (1 MiB of logits per prompt for the
released models: 64 MiB per GenerateMasks batch), from a small pool of reusable regions.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
import warnings
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

with warnings.catch_warnings():  # it imports the deprecated pkg_resources (hence setuptools<81)
    warnings.simplefilter("ignore", UserWarning)
    import tritonclient.utils.shared_memory as system_shm

from samserve import metrics, model_spec
from samserve.processing import DecoderBatch, PreparedImage


class ModelMismatchError(RuntimeError):
    """Encoder and decoder in Triton were exported from different models."""


def _input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


class EmbeddingTransport(str, enum.Enum):
    GRPC = "grpc"
    SHM = "shm"


@dataclasses.dataclass(eq=False)
class StagedEmbedding:
    """An image embedding ready for decoder calls."""

    array: np.ndarray
    """float32, C x h x w."""
    region: str | None = None
    """Name of the Triton system shared-memory region holding ``array`` (None: sent inline over gRPC)."""
    handle: Any = None


@dataclasses.dataclass(eq=False)
class _Region:
    """A registered system shared-memory region for decoder outputs."""

    name: str
    handle: Any
    nbytes: int


class _OutputRegions:
    """Reusable output regions. Sizes are rounded up to 8 classes per power of two (at most 12.5 % unused);
    idle regions are kept up to ``max_idle_bytes`` in all, so concurrent calls reuse them instead of registering
    new ones with Triton."""

    def __init__(self, client: grpcclient.InferenceServerClient, max_idle_bytes: int = 256 << 20) -> None:
        self.client = client
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[_Region]] = {}
        self._idle_bytes = 0

    @staticmethod
    def size_class(nbytes: int) -> int:
        step = 1 << max(nbytes.bit_length() - 4, 0)
        return -(-nbytes // step) * step

    async def acquire(self, nbytes: int) -> _Region:
        size = self.size_class(nbytes)
        idle = self._idle.get(size)
        if idle:
            self._idle_bytes -= size
            return idle.pop()
        name = f"samserve-out-{uuid.uuid4().hex}"
        handle = system_shm.create_shared_memory_region(name, f"/{name}", size)
        try:
            await self.client.register_system_shared_memory(name, f"/{name}", size)
        except BaseException:
            system_shm.destroy_shared_memory_region(handle)
            raise
        return _Region(name, handle, size)

    async def release(self, region: _Region) -> None:
        if self._idle_bytes + region.nbytes <= self.max_idle_bytes:
            self._idle.setdefault(region.nbytes, []).append(region)
            self._idle_bytes += region.nbytes
        else:
            await self._destroy(region)

    async def _destroy(self, region: _Region) -> None:
        try:
            await self.client.unregister_system_shared_memory(region.name)
        except InferenceServerException:
            pass  # Triton restarted or is unreachable: freeing our side is what matters
        finally:
            system_shm.destroy_shared_memory_region(region.handle)

    async def close(self) -> None:
        for regions in self._idle.values():
            for region in regions:
                await self._destroy(region)
        self._idle.clear()
        self._idle_bytes = 0


class TritonSam:
    """Encoder and decoder calls on one Triton server (gRPC)."""

    def __init__(self, url: str, embedding_transport: EmbeddingTransport | str = EmbeddingTransport.SHM) -> None:
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self.embedding_transport = EmbeddingTransport(embedding_transport)
        self._staged: dict[str, StagedEmbedding] = {}
        self._outputs = _OutputRegions(self.client)
        self.meta: model_spec.ModelMetadata | None = None
        """The served model's metadata, once :meth:`metadata` has read it (output shapes come from it)."""

    async def metadata(self) -> model_spec.ModelMetadata:
        """The served model's metadata, read from both model configs; they must agree."""
        found = []
        for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
            config = await self.client.get_model_config(model, as_json=True)
            raw = config["config"]["parameters"][model_spec.METADATA_PARAMETER]["string_value"]
            found.append(model_spec.ModelMetadata.from_json(raw))
        if found[0] != found[1]:
            raise ModelMismatchError(f"encoder {found[0].model_id} and decoder {found[1].model_id} differ")
        self.meta = found[0]
        return found[0]

    async def encode(self, image: PreparedImage, timeout_s: float | None = None) -> np.ndarray:
        """The embedding of one prepared image: float32, C x h x w. ``timeout_s`` bounds the call."""
        inputs = [
            _input(model_spec.ENC_IMAGE, image.padded[None]),
            _input(model_spec.ENC_INPUT_SIZE, np.asarray([image.input_size], dtype=np.int64)),
        ]
        outputs = [grpcclient.InferRequestedOutput(model_spec.ENC_EMBEDDING)]
        with metrics.TRITON_CALL.labels(model_spec.ENCODER_MODEL).time():
            result = await self.client.infer(
                model_spec.ENCODER_MODEL, inputs, outputs=outputs, client_timeout=timeout_s
            )
        return result.as_numpy(model_spec.ENC_EMBEDDING)[0]

    async def stage_embedding(self, embedding: np.ndarray) -> StagedEmbedding:
        """Make ``embedding`` (float32 C x h x w) ready for decoder calls; release it with release_embedding."""
        embedding = np.ascontiguousarray(embedding, dtype=np.float32)
        if self.embedding_transport is EmbeddingTransport.GRPC:
            return StagedEmbedding(embedding)
        region = f"samserve-{uuid.uuid4().hex}"
        handle = system_shm.create_shared_memory_region(region, f"/{region}", embedding.nbytes)
        try:
            system_shm.set_shared_memory_region(handle, [embedding])
            await self.client.register_system_shared_memory(region, f"/{region}", embedding.nbytes)
        except BaseException:
            system_shm.destroy_shared_memory_region(handle)
            raise
        staged = StagedEmbedding(embedding, region, handle)
        self._staged[region] = staged
        return staged

    async def release_embedding(self, staged: StagedEmbedding) -> None:
        """Free the shared-memory region behind ``staged`` (no-op for gRPC transport)."""
        if staged.region is None or self._staged.pop(staged.region, None) is None:
            return
        try:
            await self.client.unregister_system_shared_memory(staged.region)
        except InferenceServerException:
            pass  # Triton restarted (it forgot the region) or is unreachable: freeing our side is what matters
        finally:
            system_shm.destroy_shared_memory_region(staged.handle)

    def _embedding_input(self, staged: StagedEmbedding) -> grpcclient.InferInput:
        if staged.region is None:
            return _input(model_spec.DEC_EMBEDDING, staged.array[None])
        tensor = grpcclient.InferInput(model_spec.DEC_EMBEDDING, [1, *staged.array.shape], "FP32")
        tensor.set_shared_memory(staged.region, staged.array.nbytes)
        return tensor

    async def decode(
        self, embedding: StagedEmbedding, batch: DecoderBatch, timeout_s: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode N prompts of one image.

        Returns (low-res logits float32 N x M x 4h x 4w, predicted IoU float32 N x M).
        """
        inputs = [
            self._embedding_input(embedding),
            _input(model_spec.DEC_POINT_COORDS, batch.point_coords[None]),
            _input(model_spec.DEC_POINT_LABELS, batch.point_labels[None]),
            _input(model_spec.DEC_MASK_INPUT, batch.mask_input[None]),
            _input(model_spec.DEC_HAS_MASK_INPUT, batch.has_mask_input[None]),
        ]
        metrics.DECODER_BATCH_PROMPTS.observe(len(batch.prompt_indices))
        if self.embedding_transport is EmbeddingTransport.SHM and self.meta is not None:
            return await self._decode_into_shm(inputs, batch, timeout_s)
        outputs = [grpcclient.InferRequestedOutput(name) for name in model_spec.DECODER_OUTPUTS]
        with metrics.TRITON_CALL.labels(model_spec.DECODER_MODEL).time():
            result = await self.client.infer(
                model_spec.DECODER_MODEL, inputs, outputs=outputs, client_timeout=timeout_s
            )
        return result.as_numpy(model_spec.DEC_LOW_RES_MASKS)[0], result.as_numpy(model_spec.DEC_IOU_PREDICTIONS)[0]

    async def _decode_into_shm(
        self, inputs: list[grpcclient.InferInput], batch: DecoderBatch, timeout_s: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The decoder call with both outputs written by Triton into one shared-memory region (no gRPC payload)."""
        assert self.meta is not None
        n, m = len(batch.prompt_indices), self.meta.num_mask_tokens
        shapes = {model_spec.DEC_LOW_RES_MASKS: (1, n, m, *self.meta.low_res_mask_size),
                  model_spec.DEC_IOU_PREDICTIONS: (1, n, m)}
        sizes = {name: int(np.prod(shape)) * 4 for name, shape in shapes.items()}
        region = await self._outputs.acquire(sum(sizes.values()))
        try:
            outputs, offset, offsets = [], 0, {}
            for name in model_spec.DECODER_OUTPUTS:
                output = grpcclient.InferRequestedOutput(name)
                output.set_shared_memory(region.name, sizes[name], offset=offset)
                outputs.append(output)
                offsets[name], offset = offset, offset + sizes[name]
            with metrics.TRITON_CALL.labels(model_spec.DECODER_MODEL).time():
                await self.client.infer(model_spec.DECODER_MODEL, inputs, outputs=outputs, client_timeout=timeout_s)
            low_res, iou = (
                system_shm.get_contents_as_numpy(region.handle, np.float32, shapes[name], offsets[name])[0].copy()
                for name in model_spec.DECODER_OUTPUTS
            )
        finally:
            await self._outputs.release(region)
        return low_res, iou

    async def forget_output_regions(self) -> None:
        """Drop the idle output regions (after a Triton restart, which forgets registered regions)."""
        await self._outputs.close()

    async def models_ready(self) -> bool:
        """Whether Triton is reachable and both SAM models are ready."""
        try:
            return bool(
                await self.client.is_server_ready()
                and await self.client.is_model_ready(model_spec.ENCODER_MODEL)
                and await self.client.is_model_ready(model_spec.DECODER_MODEL)
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def inference_count(self, model: str) -> int:
        """How many inferences Triton has run for ``model`` (its own statistics)."""
        stats = await self.client.get_inference_statistics(model, as_json=True)
        return sum(int(entry.get("inference_count", 0)) for entry in stats.get("model_stats", []))

    async def close(self) -> None:
        """Release every staged embedding, then close the channel."""
        for staged in list(self._staged.values()):
            await self.release_embedding(staged)
        await self._outputs.close()
        await self.client.close()
