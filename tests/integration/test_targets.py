"""The serving-target registry and its templates: every config of every target, template and rendered, parses as
Triton's ModelConfig (typos in field names fail), names the model file the registry places, and batches; the
gpu-tensorrt repository's graphs, dims and engine-build script (a GPU machine's tools stood in by scripts: CI
cannot build a plan); what the gateway refuses to serve."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess

import numpy as np
import onnx
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve.triton.models import ModelMismatchError, check_engines
from samserve_build import architectures, export, repository, tensorrt
from samserve_build.targets import BATCHED_DECODER_FILE, SERVING_TARGETS
from samserve_dev.local_stack import serve_repository
from samserve_dev.polling import wait_until

CONTRACT = {
    model_spec.ENCODER_MODEL: (model_spec.ENCODER_INPUTS, model_spec.ENCODER_OUTPUTS),
    model_spec.DECODER_MODEL: (model_spec.DECODER_INPUTS, model_spec.DECODER_OUTPUTS),
}


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("target", list(SERVING_TARGETS.values()), ids=lambda t: t.name.value)
def test_templates_agree_with_the_registry(target):
    assert set(target.model_files) == {model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL}
    for model, model_file in target.model_files.items():
        config = parse((repository.TEMPLATES / target.template(model) / model / "config.pbtxt").read_text())
        assert config.name == model
        assert config.parameters["model_file"].string_value == model_file
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
        inputs, outputs = CONTRACT[model]
        assert [tensor.name for tensor in config.input] == list(inputs)  # exactly model_spec's names, in order
        assert [tensor.name for tensor in config.output] == list(outputs)


@pytest.mark.parametrize("target", list(SERVING_TARGETS.values()), ids=lambda t: t.name.value)
def test_every_rendered_config_parses_and_carries_the_metadata(target, tiny_model, tmp_path):
    checkpoint = tiny_model.checkpoint if target.needs_checkpoint else None
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo", target.name, checkpoint=checkpoint)
    precisions = set()
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        config = parse((out / model / "config.pbtxt").read_text())  # every rendered config, as Triton reads it
        raw = config.parameters[model_spec.METADATA_PARAMETER].string_value
        served = model_spec.ModelMetadata.from_json(raw)
        assert dataclasses.replace(served, precision="fp32") == tiny_model.metadata
        assert served.unservable_reason() is None
        precisions.add(served.precision)
        assert (out / model / "1" / config.parameters["model_file"].string_value).exists()
    encoder = parse((out / model_spec.ENCODER_MODEL / "config.pbtxt").read_text())
    assert precisions == {encoder.parameters[model_spec.PRECISION_PARAMETER].string_value
                          if model_spec.PRECISION_PARAMETER in encoder.parameters else "fp32"}


def test_gpu_torch_runs_the_checkpoint_the_metadata_names(tiny_model, tmp_path):
    with pytest.raises(repository.RepositoryError, match="give its path"):
        repository.write_repository(tiny_model.directory, tmp_path / "a", "gpu-torch")
    other_weights = architectures.write_random_checkpoint("tiny", 1, tmp_path / "other.pth")
    with pytest.raises(repository.RepositoryError, match="not the checkpoint"):
        repository.write_repository(tiny_model.directory, tmp_path / "b", "gpu-torch", checkpoint=other_weights)
    out = repository.write_repository(tiny_model.directory, tmp_path / "c", "gpu-torch",
                                      checkpoint=tiny_model.checkpoint, instance_kind="KIND_CPU",
                                      parameters={"device": "cpu", "precision": "fp32"})
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        config = parse((out / model / "config.pbtxt").read_text())
        assert [group.kind for group in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        assert config.parameters["device"].string_value == "cpu"
        assert (out / model / "1" / model_spec.CHECKPOINT_FILE).read_bytes() == tiny_model.checkpoint.read_bytes()
    with pytest.raises(repository.RepositoryError, match="no config of target gpu-torch has"):
        repository.write_repository(tiny_model.directory, tmp_path / "d", "gpu-torch",
                                    checkpoint=tiny_model.checkpoint, parameters={"devise": "cpu"})


def _onnx_dims(path) -> dict[str, list[int]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {value.name: [dim.dim_value if dim.HasField("dim_value") else -1
                         for dim in value.type.tensor_type.shape.dim] for value in [*graph.input, *graph.output]}


def test_tensorrt_configs_state_the_exact_dims_of_the_graphs_the_plans_come_from(tiny_model, tmp_path):
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo", "gpu-tensorrt")
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        config = parse((out / model / "config.pbtxt").read_text())
        assert config.platform == "tensorrt_plan"
        assert dict(config.cc_model_filenames) == {cc: tensorrt.plan_file(cc) for cc in tensorrt.COMPUTE_CAPABILITIES}
        graph = _onnx_dims(out / model / "1" / config.parameters["model_file"].string_value)
        for tensor in [*config.input, *config.output]:
            declared, batch = graph[tensor.name], -1 if model == model_spec.ENCODER_MODEL else 1
            assert declared[0] in (batch, -1)  # the batch axis: dynamic (encoder) or one image (decoder)
            fixed = [d for d, g in zip(tensor.dims, declared[1:], strict=True) if g != -1]
            assert fixed == [g for g in declared[1:] if g != -1], tensor.name  # every fixed size repeated
            assert all(d == -1 for d, g in zip(tensor.dims, declared[1:], strict=True) if g == -1
                       and tensor.name in model_spec.DECODER_INPUTS[1:]), tensor.name  # prompts, tokens stay free


def test_the_batched_decoder_computes_exactly_what_the_decoder_does(tiny_model, tmp_path):
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo", "gpu-tensorrt")
    batched = onnx_runner.create_session(out / model_spec.DECODER_MODEL / "1" / BATCHED_DECODER_FILE)
    plain = onnx_runner.create_session(tiny_model.directory / model_spec.DECODER_FILE)
    rng = np.random.default_rng(0)
    for prompts, tokens in ((1, 1), (5, 3)):
        feeds = export.decoder_inputs(tiny_model.metadata, prompts, tokens, rng)
        expected = onnx_runner.run(plain, feeds)
        got = onnx_runner.run(batched, {name: value if name == model_spec.DEC_EMBEDDING else value[None]
                                         for name, value in feeds.items()})
        for name in model_spec.DECODER_OUTPUTS:
            assert got[name].shape == (1, *expected[name].shape)
            np.testing.assert_array_equal(got[name][0], expected[name])


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TENSORRT:-100700}] # trtexec $*"
echo "$*" >> "$FAKE_CALLS"
for arg in "$@"; do case "$arg" in --saveEngine=*) echo plan > "${arg#--saveEngine=}" ;; esac; done
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in *compute_cap*) echo "9.0" ;; *name*) echo "NVIDIA H100 80GB HBM3" ;; esac
"""


@pytest.fixture
def fake_gpu_tools(tmp_path, monkeypatch):
    """trtexec and nvidia-smi stand-ins (a GPU machine's tools), to test what the engine-build script does."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, text in (("trtexec", FAKE_TRTEXEC), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.txt"))
    return tmp_path / "calls.txt"


def test_the_engine_script_builds_each_plan_and_records_it_once(tiny_model, tmp_path, fake_gpu_tools):
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo", "gpu-tensorrt")
    for _ in range(2):  # idempotent: a second run replaces the records
        tensorrt.build_engines(out)
    calls = [line for line in fake_gpu_tools.read_text().splitlines() if "--saveEngine" in line]
    assert len(calls) == 4
    encoder_call = calls[0].split()
    assert f"--onnx={out}/sam_encoder/1/encoder.fp16.onnx" in encoder_call
    assert f"--saveEngine={out}/sam_encoder/1/model_cc90.plan" in encoder_call
    assert "--stronglyTyped" in encoder_call and f"--timingCacheFile={out}/{tensorrt.TIMING_CACHE_FILE}" in encoder_call
    size = tiny_model.metadata.image_size
    assert f"--maxShapes=image:8x{size}x{size}x3,input_size:8x2" in encoder_call
    assert any(arg.startswith("--maxShapes=") and "point_coords:1x64x16x2" in arg for arg in calls[1].split())
    configs = {}
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        assert (out / model / "1" / "model_cc90.plan").exists()
        config = parse((out / model / "config.pbtxt").read_text())
        configs[model] = json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))
        assert [key for key in config.parameters if key.startswith(model_spec.ENGINE_PARAMETER_PREFIX)] == [
            "samserve_engine_cc90"]
    engines = check_engines(configs)
    assert engines[0] == model_spec.EngineRecord(plan="model_cc90.plan", compute_capability="9.0",
                                                 gpu_name="NVIDIA H100 80GB HBM3", tensorrt_version="10.7.0")
    assert len(engines) == 2


def test_the_engine_script_refuses_another_tensorrt_major(tiny_model, tmp_path, fake_gpu_tools, monkeypatch):
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo", "gpu-tensorrt")
    monkeypatch.setenv("FAKE_TENSORRT", "110200")
    result = subprocess.run(["bash", str(out / tensorrt.SCRIPT_FILE)], capture_output=True, text=True)
    assert result.returncode == 2 and "for TensorRT 10.x" in result.stderr and "--tensorrt-major 11" in result.stderr
    assert not fake_gpu_tools.exists() or "--saveEngine" not in fake_gpu_tools.read_text()
    out11 = repository.write_repository(tiny_model.directory, tmp_path / "repo11", "gpu-tensorrt", tensorrt_major=11)
    tensorrt.build_engines(out11)
    assert "--stronglyTyped" not in fake_gpu_tools.read_text()  # 11.x: always strongly typed, the flag is gone


def test_the_gateway_names_engines_it_cannot_serve():
    record = model_spec.EngineRecord("model_cc90.plan", "9.0", "NVIDIA H100 80GB HBM3", "10.7.0")

    def config(platform: str, *records: model_spec.EngineRecord) -> dict:
        return {"platform": platform,
                "parameters": {r.parameter: {"string_value": r.to_json()} for r in records}}

    with pytest.raises(ModelMismatchError, match="sam_encoder is a TensorRT plan but its config records no engine"):
        check_engines({"sam_encoder": config("tensorrt_plan"), "sam_decoder": config("tensorrt_plan", record)})
    other = dataclasses.replace(record, tensorrt_version="10.8.0")
    with pytest.raises(ModelMismatchError, match=r"compute capability 9.0 .* \['10.7.0', '10.8.0'\]"):
        check_engines({"sam_encoder": config("tensorrt_plan", record), "sam_decoder": config("tensorrt_plan", other)})
    assert check_engines({"sam_encoder": config(""), "sam_decoder": config("")}) == ()


def _gateway_log_once_not_serving(gateway_factory, url: str, needle: str) -> str:
    gateway = gateway_factory(url, None, wait_serving=False)
    wait_until(lambda: needle in gateway.log(), bool, f"the gateway's log naming {needle!r}", timeout_s=60)
    assert gateway.health() == "NOT_SERVING"
    return gateway.log()


def test_a_gateway_says_why_it_cannot_serve_what_triton_serves(tiny_model, tmp_path, gateway_factory):
    """Metadata it cannot serve (a precision of a newer release), and a model Triton could not load: health stays
    NOT_SERVING and the log says why, in both cases."""
    repo = repository.write_repository(tiny_model.directory, tmp_path / "newer")
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        config = repo / model / "config.pbtxt"
        config.write_text(config.read_text().replace('\\"precision\\": \\"fp32\\"', '\\"precision\\": \\"fp8\\"'))
        assert "fp8" in config.read_text()
    with serve_repository(repo, tmp_path / "newer-triton") as triton:
        log = _gateway_log_once_not_serving(gateway_factory, triton.grpc_url, "model precision 'fp8'")
        assert "upgrade the gateway" in log

    broken = repository.write_repository(tiny_model.directory, tmp_path / "broken")
    (broken / model_spec.DECODER_MODEL / "1" / model_spec.DECODER_FILE).unlink()  # e.g. a plan for another GPU
    with serve_repository(broken, tmp_path / "broken-triton", models=(),
                          extra_args=["--exit-on-error=false", "--strict-readiness=false"]) as triton:
        log = _gateway_log_once_not_serving(gateway_factory, triton.grpc_url, "Triton cannot serve the SAM models")
        line = next(line for line in log.splitlines() if "Triton cannot serve the SAM models" in line)
        assert "sam_decoder UNAVAILABLE" in line and "sam_encoder" not in line


def test_a_gateway_refuses_an_encoder_and_a_decoder_of_different_models(tiny_model, tmp_path, gateway_factory):
    """Triton serves both models, but the decoder's metadata names another model than the encoder's (a repository
    assembled from two exports): the gateway never pairs them, health stays NOT_SERVING and the log names both."""
    repo = repository.write_repository(tiny_model.directory, tmp_path / "mixed")
    config = repo / model_spec.DECODER_MODEL / "config.pbtxt"
    text = config.read_text()
    mixed = re.sub(r'\\"model_id\\": \\"[^\\]*\\"', lambda _: '\\"model_id\\": \\"other:model\\"', text)
    assert mixed != text and "other:model" in mixed
    config.write_text(mixed)
    with serve_repository(repo, tmp_path / "mixed-triton") as triton:
        log = _gateway_log_once_not_serving(gateway_factory, triton.grpc_url, "and decoder other:model differ")
        assert f"encoder {tiny_model.metadata.model_id} and decoder other:model differ" in log
