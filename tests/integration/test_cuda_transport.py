"""The ``cuda`` embedding transport's bookkeeping, without a GPU (none here): tritonclient's CUDA shared-memory module
and Triton's client are stood in for, so what is checked is this module's part: each embedding staged once in a
region of the configured device and registered under the raw handle, referenced by name in decoder calls, released
once (unregistered and its GPU memory freed), and a failed registration frees the memory it took."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient

from samserve.triton import transports


class FakeCudaShm:
    """tritonclient.utils.cuda_shared_memory as the transport uses it: regions are numpy buffers."""

    def __init__(self) -> None:
        self.regions: dict[str, dict] = {}

    def create_shared_memory_region(self, name: str, nbytes: int, device_id: int) -> str:
        self.regions[name] = {"bytes": np.zeros(nbytes, np.uint8), "device": device_id}
        return name

    def set_shared_memory_region(self, handle: str, arrays: list[np.ndarray]) -> None:
        data = np.concatenate([np.ascontiguousarray(a).view(np.uint8).ravel() for a in arrays])
        self.regions[handle]["bytes"][: data.size] = data

    def get_raw_handle(self, handle: str) -> bytes:
        return f"raw:{handle}".encode()

    def destroy_shared_memory_region(self, handle: str) -> None:
        del self.regions[handle]


class FakeClient:
    def __init__(self, fail_register: bool = False) -> None:
        self.registered: dict[str, tuple[bytes, int, int]] = {}
        self.fail_register = fail_register

    async def register_cuda_shared_memory(self, name: str, raw: bytes, device_id: int, nbytes: int) -> None:
        if self.fail_register:
            raise RuntimeError("Triton refused the region")
        self.registered[name] = (raw, device_id, nbytes)

    async def unregister_cuda_shared_memory(self, name: str) -> None:
        del self.registered[name]


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCudaShm:
    fake = FakeCudaShm()
    monkeypatch.setattr(transports, "_cuda_shm", lambda: fake)
    return fake


def test_an_embedding_is_staged_once_on_the_device_and_released_once(fake_cuda):
    client = FakeClient()
    transport = transports.CudaSharedMemory(client, device_id=1)  # type: ignore[arg-type]
    embedding = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)

    async def run() -> None:
        staged = await transport.stage(embedding)
        assert list(client.registered) == [staged.region] == list(fake_cuda.regions)
        raw, device, nbytes = client.registered[staged.region]
        assert raw == f"raw:{staged.region}".encode() and device == 1 and nbytes == embedding.nbytes
        assert fake_cuda.regions[staged.region]["device"] == 1
        np.testing.assert_array_equal(fake_cuda.regions[staged.region]["bytes"].view(np.float32).reshape(2, 4, 4),
                                      embedding)
        tensor = grpcclient.InferInput("image_embeddings", [1, 2, 4, 4], "FP32")
        transport.attach(tensor, embedding, staged)  # decoder calls name the region, the bytes stay on the GPU
        parameters = tensor._get_tensor().parameters
        assert parameters["shared_memory_region"].string_param == staged.region
        assert parameters["shared_memory_byte_size"].int64_param == embedding.nbytes
        await transport.release(staged)
        await transport.release(staged)  # a second release is a no-op
        assert client.registered == {} and fake_cuda.regions == {}

    asyncio.run(run())


def test_a_refused_registration_frees_the_device_memory(fake_cuda):
    transport = transports.CudaSharedMemory(FakeClient(fail_register=True))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="refused"):
        asyncio.run(transport.stage(np.ones((2, 2), np.float32)))
    assert fake_cuda.regions == {}


def test_without_cuda_python_the_transport_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.utils.cuda_shared_memory", None)  # import fails, as without it
    with pytest.raises(RuntimeError, match="SAMSERVE_EMBEDDING_TRANSPORT=cuda needs the cuda-python package"):
        transports.CudaSharedMemory(FakeClient())  # type: ignore[arg-type]
