"""The real Triton server: launcher, metadata via the model-config API, per-request errors inside a batch."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve.core.errors import Internal, Unavailable
from samserve.launch import triton_server
from samserve.triton.models import ModelLayout, TritonSam
from samserve.vision import processing, segmentation
from samserve_build import repository
from samserve_dev.images import synthetic_image
from samserve_dev.local_stack import free_port
from samserve_dev.polling import wait_until
from samserve_dev.sockets import children, is_loopback, listening


def test_served_metadata_equals_exported(tiny_triton, event_loop_runner):
    async def read():
        client = TritonSam(tiny_triton.url)
        try:
            return await client.metadata()
        finally:
            await client.close()

    assert event_loop_runner.run(read()) == tiny_triton.model.metadata


def _encoder_inputs(image: np.ndarray, input_size) -> list[aioclient.InferInput]:
    first = aioclient.InferInput(model_spec.ENC_IMAGE, list(image.shape), "UINT8")
    first.set_data_from_numpy(image)
    sizes = np.asarray([input_size], dtype=np.int64)
    second = aioclient.InferInput(model_spec.ENC_INPUT_SIZE, list(sizes.shape), "INT64")
    second.set_data_from_numpy(sizes)
    return [first, second]


def test_a_bad_request_fails_alone_inside_a_dynamic_batch(tiny_triton, event_loop_runner):
    meta = tiny_triton.model.metadata
    prepared = [processing.prepare_image(synthetic_image(60 + 10 * i, 80, seed=i), meta.image_size) for i in range(5)]
    bad_index = 2

    async def fire():
        client = aioclient.InferenceServerClient(tiny_triton.url)
        try:
            calls = []
            for i, item in enumerate(prepared):
                size = (meta.image_size + 1, 5) if i == bad_index else item.input_size
                calls.append(client.infer(model_spec.ENCODER_MODEL, _encoder_inputs(item.padded[None], size)))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    results = event_loop_runner.run(fire())
    error = results[bad_index]
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input_size must lie in" in error.message()
    session = onnx_runner.create_session(tiny_triton.model.directory / model_spec.ENCODER_FILE)
    for i, (item, result) in enumerate(zip(prepared, results, strict=True)):
        if i == bad_index:
            continue
        expected = onnx_runner.run(session, {
            model_spec.ENC_IMAGE: item.padded[None], model_spec.ENC_INPUT_SIZE: np.asarray([item.input_size]),
        })[model_spec.ENC_EMBEDDING]
        np.testing.assert_allclose(result.as_numpy(model_spec.ENC_EMBEDDING), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (model_spec.DEC_POINT_LABELS, 7.0, "point_labels must be one of"),
        (model_spec.DEC_POINT_COORDS, np.nan, "point_coords must be finite"),
        (model_spec.DEC_HAS_MASK_INPUT, 0.5, "has_mask_input must be 0 or 1"),
    ],
)
def test_decoder_rejects_invalid_prompts(tiny_triton, field, value, message):
    meta = tiny_triton.model.metadata
    feeds = {
        model_spec.DEC_EMBEDDING: np.zeros((1, *meta.embedding_shape), np.float32),
        model_spec.DEC_POINT_COORDS: np.ones((1, 1, 2, 2), np.float32),
        model_spec.DEC_POINT_LABELS: np.array([[[1, -1]]], np.float32),
        model_spec.DEC_MASK_INPUT: np.zeros((1, 1, 1, *meta.low_res_mask_size), np.float32),
        model_spec.DEC_HAS_MASK_INPUT: np.zeros((1, 1), np.float32),
    }
    feeds[field] = np.full_like(feeds[field], value)
    client = grpcclient.InferenceServerClient(tiny_triton.url)
    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model_spec.DECODER_MODEL, inputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in caught.value.message()
    # Wrong embedding size for this model: rejected with the expected layout in the message.
    valid = np.ones_like(feeds[field]) if field != model_spec.DEC_HAS_MASK_INPUT else np.zeros_like(feeds[field])
    feeds = {**feeds, field: valid}
    feeds[model_spec.DEC_EMBEDDING] = np.zeros((1, meta.embedding_shape[0], 8, 8), np.float32)
    inputs[0] = grpcclient.InferInput(model_spec.DEC_EMBEDDING, [1, meta.embedding_shape[0], 8, 8], "FP32")
    inputs[0].set_data_from_numpy(feeds[model_spec.DEC_EMBEDDING])
    with pytest.raises(InferenceServerException, match="image_embeddings must be"):
        client.infer(model_spec.DECODER_MODEL, inputs)
    client.close()


def test_launcher_reports_a_model_that_cannot_load(tiny_model, tmp_path):
    repo = repository.write_repository(tiny_model.directory, tmp_path / "repo")
    config = repo / model_spec.DECODER_MODEL / "config.pbtxt"
    config.write_text(config.read_text().split("# Appended by samserve-build")[0])  # drop the metadata
    server = triton_server.TritonServer(repo, tmp_path / "work", free_port(), free_port(), free_port())
    with pytest.raises(triton_server.TritonStartError, match=model_spec.METADATA_PARAMETER):
        with triton_server.running_triton(server, 120, (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)):
            pass
    assert server.process is not None and server.process.poll() is not None


def test_prepare_then_up_serves_and_stops_cleanly(tmp_path):
    """What `make up` runs: `samserve-build prepare` (target auto) then `samserve up` (Redis + Triton + gateway),
    tiny model, and the README's command-line client segments an image through it with an API key; everything listens
    on loopback only."""
    env = dict(os.environ, SAMSERVE_WORKDIR=str(tmp_path), SAMSERVE_MODEL_VARIANT="tiny", SAMSERVE_RANDOM_SEED="4")
    ports = {"SAMSERVE_TRITON_HTTP_PORT": free_port(), "SAMSERVE_TRITON_GRPC_PORT": free_port(),
             "SAMSERVE_TRITON_METRICS_PORT": free_port(), "SAMSERVE_GATEWAY_PORT": free_port(),
             "SAMSERVE_METRICS_PORT": free_port(), "SAMSERVE_REDIS_SERVER_PORT": free_port()}
    env.update({k: str(v) for k, v in ports.items()})
    bin_dir = os.path.dirname(sys.executable)
    prepare = [f"{bin_dir}/samserve-build", "prepare"]
    prepared = subprocess.run(prepare, env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert "RANDOM weights" in prepared.stderr
    # SAMSERVE_TARGET unset: auto calibrated the CPU targets once and cached its choice in the workdir.
    assert "auto: calibrating" in prepared.stderr and (tmp_path / "cpu-choice.json").exists()
    # A second prepare reuses the export and the choice.
    again = subprocess.run(prepare, env=env, capture_output=True, text=True, timeout=300)
    assert "already exported" in again.stderr
    assert "auto: calibrating" not in again.stderr and "auto: encoder as cpu-" in again.stderr

    # Auth on, as a deployment runs it: a key made with the CLI, sent by the client command.
    keys = [f"{bin_dir}/samserve", "keys", "add", "--tenant", "dev", "--file", str(tmp_path / "keys.json")]
    token = subprocess.run(keys, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    env.update(SAMSERVE_AUTH="api-keys", SAMSERVE_API_KEYS_FILE=str(tmp_path / "keys.json"),
               SAMSERVE_CLIENT_TOKEN=token)
    process = subprocess.Popen([f"{bin_dir}/samserve", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['SAMSERVE_TRITON_GRPC_PORT']}")

        def models_ready() -> bool:
            try:
                return all(client.is_model_ready(m) for m in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL))
            except InferenceServerException:
                return False

        wait_until(models_ready, bool, "Triton's models ready under `samserve up`", timeout_s=120, interval_s=0.25)
        meta = model_spec.ModelMetadata.read(tmp_path / "models" / "tiny-random-seed4")
        assert meta.model_id == "tiny-random-seed4"
        image = tmp_path / "scene.png"
        Image.fromarray(synthetic_image(90, 120, seed=2)).save(image)
        overlay = tmp_path / "overlay.png"
        segment = [f"{bin_dir}/samserve", "segment", str(image), "--point", "60,45", "--point", "10,10,0",
                   "--out", str(overlay)]
        # The gateway turns SERVING within a health-check interval of Triton: retry only while it says UNAVAILABLE.
        result = wait_until(lambda: subprocess.run(segment, env=env, capture_output=True, text=True, timeout=60),
                            lambda done: done.returncode == 0 or "UNAVAILABLE" not in done.stderr,
                            "`samserve segment` against `samserve up`", timeout_s=60, interval_s=0.2)
        assert result.returncode == 0, result.stderr
        assert "model tiny-random-seed4" in result.stdout and "mask token 1" in result.stdout
        assert Image.open(overlay).size == (120, 90)
        anonymous = {k: v for k, v in env.items() if k != "SAMSERVE_CLIENT_TOKEN"}
        refused = subprocess.run(segment, env=anonymous, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        # Gateway (this process), Triton and Redis (its children) listen on loopback only.
        addresses = {address for pid in (process.pid, *children(process.pid)) for address in listening(pid)}
        assert len(addresses) >= 1 and all(is_loopback(address) for address in addresses), addresses
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in children(process.pid)}
        assert {"tritonserver", "redis-server"} <= names, names
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "gateway listening on" in output and "redis-server on" in output and "stopping" in output


def test_embedding_transports_give_identical_answers_and_release_their_memory(tiny_triton, event_loop_runner):
    image = synthetic_image(90, 120, seed=11)
    prompt = processing.Prompt(points=np.array([[60.0, 45.0]]), labels=np.array([1]))

    async def run(transport: str):
        client = TritonSam(tiny_triton.url, embedding_transport=transport)
        try:
            meta = await client.metadata()
            embedded = await client.stage(await client.encode(processing.prepare_image(image, meta.image_size)))
            answer = (await segmentation.segment(client, meta, embedded, [prompt]))[0]
            regions_while_staged = await client.client.get_system_shared_memory_status(as_json=True)
            await client.release(embedded)
            regions_after = await client.client.get_system_shared_memory_status(as_json=True)
            return embedded, answer, regions_while_staged, regions_after
        finally:
            await client.close()

    grpc_embedded, grpc_answer, _, _ = event_loop_runner.run(run("grpc"))
    shm_embedded, shm_answer, staged, after = event_loop_runner.run(run("shm"))
    assert grpc_embedded.staged.region is None and grpc_embedded.staged.shared_bytes == 0
    region = shm_embedded.staged.region
    assert region is not None and region in str(staged) and region not in str(after)
    assert shm_embedded.nbytes == 2 * shm_embedded.embedding.array.nbytes
    np.testing.assert_array_equal(grpc_answer.low_res_logits, shm_answer.low_res_logits)
    np.testing.assert_array_equal(grpc_answer.iou_predictions, shm_answer.iou_predictions)


def test_request_layout_comes_from_the_served_configs(tiny_triton, event_loop_runner):
    """Batch axis, ranks and dtypes are read from Triton's model configs, not assumed."""
    async def read():
        client = TritonSam(tiny_triton.url)
        try:
            await client.metadata()
            return client.served
        finally:
            await client.close()

    served = event_loop_runner.run(read())
    assert served.encoder.batched and served.decoder.batched
    assert served.encoder.dtypes[model_spec.ENC_IMAGE] == np.uint8
    assert served.encoder.dtypes[model_spec.ENC_INPUT_SIZE] == np.int64
    assert served.decoder.dtypes[model_spec.DEC_EMBEDDING] == np.float32
    assert served.decoder.ranks[model_spec.DEC_POINT_COORDS] == 3
    # The same item in a model without a batch axis and with a 4-D embedding input (a TensorRT plan's layout).
    unbatched = ModelLayout(batched=False, ranks={model_spec.DEC_EMBEDDING: 4},
                            dtypes={model_spec.DEC_EMBEDDING: np.float16})
    tensor, data = unbatched.declare(model_spec.DEC_EMBEDDING, np.zeros((8, 4, 4), np.float32))
    assert tensor.shape() == [1, 8, 4, 4] and tensor.datatype() == "FP16" and data.dtype == np.float16
    assert served.decoder.wire_shape(model_spec.DEC_EMBEDDING, (8, 4, 4)) == (1, 8, 4, 4)
    assert served.decoder.wire_shape(model_spec.DEC_POINT_COORDS, (5, 2, 2)) == (1, 5, 2, 2)


def test_triton_failures_become_domain_errors(tiny_triton, event_loop_runner):
    """Unreachable Triton is UNAVAILABLE; a request Triton rejects is the service's fault (INTERNAL)."""
    async def scenario():
        unreachable = TritonSam(f"127.0.0.1:{free_port()}")
        with pytest.raises(Unavailable):
            await unreachable.metadata()
        await unreachable.close()
        client = TritonSam(tiny_triton.url)
        try:
            meta = await client.metadata()
            prepared = processing.prepare_image(synthetic_image(40, 50, seed=3), meta.image_size)
            broken = dataclasses.replace(prepared, input_size=(meta.image_size + 1, 5))
            with pytest.raises(Internal, match="input_size must lie in"):
                await client.encode(broken)
        finally:
            await client.close()

    event_loop_runner.run(scenario())
