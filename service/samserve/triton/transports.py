"""How tensors travel between the gateway and Triton: one object per transport, chosen from :data:`TRANSPORTS`.

Every decoder call needs the image embedding (4 MiB in fp32 for the released models).

* ``grpc`` (:class:`InlineGrpc`): the embedding and the outputs travel inside each request and response. Works
  across hosts.
* ``shm`` (:class:`SystemSharedMemory`): the embedding is staged once in a Triton system shared-memory region that
  every later decoder call references by name; the decoder's outputs (1 MiB of logits per prompt for the
  released models: 64 MiB per GenerateMasks batch) come back through a small pool of reusable regions. Gateway
  and Triton must share a host. Measured on the 2-core CPU with vit_b (bench/results/models_cpu.json): it saves
  several ms per decoder call, so it is the default.

* ``cuda`` (:class:`CudaSharedMemory`): as ``shm``, but the embedding is staged once in GPU memory (a Triton CUDA
  shared-memory region, tritonclient's ``cuda_shared_memory``), so a GPU decoder reads it without a host-to-device
  copy per call; the outputs come back through system shared memory (the gateway needs them on the host). Gateway
  and a GPU Triton on one host (one pod); needs the ``cuda-python`` package and that GPU visible to the gateway.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

with warnings.catch_warnings():  # it imports the deprecated pkg_resources (hence setuptools<81)
    warnings.simplefilter("ignore", UserWarning)
    import tritonclient.utils.shared_memory as system_shm

from samserve.core.embedding import Staged
from samserve.core.settings import TransportName

OutputSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]
"""Output name -> (shape, dtype) of a call's outputs, as the served model's config declares them."""


class Transport(Protocol):
    """Moves the embedding to Triton and a call's outputs back."""

    async def stage(self, array: np.ndarray) -> Staged:
        """Make a C-contiguous embedding reachable by decoder calls; undo with :meth:`release`."""

    async def release(self, staged: Staged) -> None: ...

    def attach(self, tensor: grpcclient.InferInput, array: np.ndarray, staged: Staged) -> None:
        """Fill the request tensor of an embedding staged by :meth:`stage` (``array`` has the tensor's shape)."""

    async def infer(
        self, model: str, inputs: Sequence[grpcclient.InferInput], outputs: OutputSpec, timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        """Run ``model``; its outputs as arrays of the given shapes."""

    async def forget(self) -> None:
        """Drop what Triton may have forgotten (it restarted): idle regions are not reused."""

    async def close(self) -> None: ...


async def infer_inline(
    client: grpcclient.InferenceServerClient, model: str, inputs: Sequence[grpcclient.InferInput],
    outputs: Sequence[str], timeout_s: float | None,
) -> dict[str, np.ndarray]:
    """A call whose outputs come back inside the gRPC response."""
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    result = await client.infer(model, list(inputs), outputs=requested, client_timeout=timeout_s)
    return {name: result.as_numpy(name) for name in outputs}


class InlineGrpc:
    """Everything inside the gRPC messages."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.client = client

    async def stage(self, array: np.ndarray) -> Staged:
        return Staged()

    async def release(self, staged: Staged) -> None:
        return None

    def attach(self, tensor: grpcclient.InferInput, array: np.ndarray, staged: Staged) -> None:
        tensor.set_data_from_numpy(array)

    async def infer(
        self, model: str, inputs: Sequence[grpcclient.InferInput], outputs: OutputSpec, timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        return await infer_inline(self.client, model, inputs, list(outputs), timeout_s)

    async def forget(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _OutputRegions:
    """Reusable output regions. Sizes are rounded up to 8 classes per power of two (at most 12.5 % unused);
    idle regions are kept up to ``max_idle_bytes`` in all, so concurrent calls reuse them instead of registering
    new ones with Triton."""

    def __init__(self, client: grpcclient.InferenceServerClient, max_idle_bytes: int = 256 << 20) -> None:
        self.client = client
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[Staged]] = {}
        self._idle_bytes = 0

    @staticmethod
    def size_class(nbytes: int) -> int:
        step = 1 << max(nbytes.bit_length() - 4, 0)
        return -(-nbytes // step) * step

    async def acquire(self, nbytes: int) -> Staged:
        size = self.size_class(nbytes)
        idle = self._idle.get(size)
        if idle:
            self._idle_bytes -= size
            return idle.pop()
        return await _register(self.client, "samserve-out", size)

    async def release(self, region: Staged) -> None:
        if self._idle_bytes + region.shared_bytes <= self.max_idle_bytes:
            self._idle.setdefault(region.shared_bytes, []).append(region)
            self._idle_bytes += region.shared_bytes
        else:
            await _unregister(self.client, region)

    async def close(self) -> None:
        for regions in self._idle.values():
            for region in regions:
                await _unregister(self.client, region)
        self._idle.clear()
        self._idle_bytes = 0


async def _register(client: grpcclient.InferenceServerClient, prefix: str, nbytes: int) -> Staged:
    """A new system shared-memory region of ``nbytes``, registered with Triton."""
    name = f"{prefix}-{uuid.uuid4().hex}"
    handle = system_shm.create_shared_memory_region(name, f"/{name}", nbytes)
    try:
        await client.register_system_shared_memory(name, f"/{name}", nbytes)
    except BaseException:
        system_shm.destroy_shared_memory_region(handle)
        raise
    return Staged(region=name, handle=handle, shared_bytes=nbytes)


async def _unregister(client: grpcclient.InferenceServerClient, region: Staged) -> None:
    try:
        await client.unregister_system_shared_memory(region.region)
    except InferenceServerException:
        pass  # Triton restarted (it forgot the region) or is unreachable: freeing our side is what matters
    finally:
        system_shm.destroy_shared_memory_region(region.handle)


class SystemSharedMemory:
    """Embeddings staged once in system shared memory; decoder outputs written by Triton into pooled regions."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.client = client
        self._staged: dict[str, Staged] = {}
        self._outputs = _OutputRegions(client)

    async def stage(self, array: np.ndarray) -> Staged:
        staged = await _register(self.client, "samserve", array.nbytes)
        try:
            system_shm.set_shared_memory_region(staged.handle, [array])
        except BaseException:
            await _unregister(self.client, staged)
            raise
        assert staged.region is not None
        self._staged[staged.region] = staged
        return staged

    async def release(self, staged: Staged) -> None:
        if staged.region is not None and self._staged.pop(staged.region, None) is not None:
            await _unregister(self.client, staged)

    def attach(self, tensor: grpcclient.InferInput, array: np.ndarray, staged: Staged) -> None:
        tensor.set_shared_memory(staged.region, array.nbytes)

    async def infer(
        self, model: str, inputs: Sequence[grpcclient.InferInput], outputs: OutputSpec, timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        sizes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, (shape, dtype) in outputs.items()}
        region = await self._outputs.acquire(sum(sizes.values()))
        try:
            requested, offsets, offset = [], {}, 0
            for name in outputs:
                output = grpcclient.InferRequestedOutput(name)
                output.set_shared_memory(region.region, sizes[name], offset=offset)
                requested.append(output)
                offsets[name], offset = offset, offset + sizes[name]
            await self.client.infer(model, list(inputs), outputs=requested, client_timeout=timeout_s)
            return {
                name: system_shm.get_contents_as_numpy(region.handle, dtype, shape, offsets[name]).copy()
                for name, (shape, dtype) in outputs.items()
            }
        finally:
            await self._outputs.release(region)

    async def forget(self) -> None:
        await self._outputs.close()

    async def close(self) -> None:
        """Release every staged embedding and output region."""
        for staged in list(self._staged.values()):
            await self.release(staged)
        await self._outputs.close()


def _cuda_shm() -> Any:
    """tritonclient's CUDA shared-memory module (it needs ``cuda-python`` and a CUDA driver)."""
    try:
        import tritonclient.utils.cuda_shared_memory as cuda_shm
    except Exception as error:  # noqa: BLE001 - ImportError, or the driver library missing
        raise RuntimeError(
            "SAMSERVE_EMBEDDING_TRANSPORT=cuda needs the cuda-python package and a GPU visible to the gateway "
            f"({error}); use shm or grpc on this host") from error
    return cuda_shm


class CudaSharedMemory(SystemSharedMemory):
    """Embeddings staged once in GPU memory (CUDA shared memory, device ``device_id``); outputs as
    :class:`SystemSharedMemory`."""

    def __init__(self, client: grpcclient.InferenceServerClient, device_id: int = 0) -> None:
        super().__init__(client)
        self.cuda_shm = _cuda_shm()
        self.device_id = device_id

    async def stage(self, array: np.ndarray) -> Staged:
        name = f"samserve-cuda-{uuid.uuid4().hex}"
        handle = self.cuda_shm.create_shared_memory_region(name, array.nbytes, self.device_id)
        staged = Staged(region=name, handle=handle, shared_bytes=array.nbytes)
        try:
            self.cuda_shm.set_shared_memory_region(handle, [array])
            await self.client.register_cuda_shared_memory(
                name, self.cuda_shm.get_raw_handle(handle), self.device_id, array.nbytes)
        except BaseException:
            self.cuda_shm.destroy_shared_memory_region(handle)
            raise
        self._staged[name] = staged
        return staged

    async def release(self, staged: Staged) -> None:
        if staged.region is None or self._staged.pop(staged.region, None) is None:
            return
        try:
            await self.client.unregister_cuda_shared_memory(staged.region)
        except InferenceServerException:
            pass  # Triton restarted or is unreachable: freeing the GPU memory is what matters
        finally:
            self.cuda_shm.destroy_shared_memory_region(staged.handle)


TRANSPORTS: dict[TransportName, Callable[[grpcclient.InferenceServerClient], Transport]] = {
    TransportName.GRPC: InlineGrpc,
    TransportName.SHM: SystemSharedMemory,
    TransportName.CUDA: CudaSharedMemory,
}
"""Transport by name (``SAMSERVE_EMBEDDING_TRANSPORT``)."""


def create_transport(name: TransportName | str, client: grpcclient.InferenceServerClient) -> Transport:
    return TRANSPORTS[TransportName(name)](client)

