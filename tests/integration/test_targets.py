"""The serving-target registry and its templates: every config parses as Triton's ModelConfig (typos in field names
fail), names the model file the registry places, and batches."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from samserve import model_spec
from samserve_build import repository
from samserve_build.targets import SERVING_TARGETS

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
        config = parse((repository.TEMPLATES / target.templates / model / "config.pbtxt").read_text())
        assert config.name == model
        assert config.parameters["model_file"].string_value == model_file
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
        inputs, outputs = CONTRACT[model]
        assert [tensor.name for tensor in config.input] == list(inputs)  # exactly model_spec's names, in order
        assert [tensor.name for tensor in config.output] == list(outputs)


def test_rendered_repository_configs_parse_and_carry_the_metadata(tiny_model, tmp_path):
    out = repository.write_repository(tiny_model.directory, tmp_path / "repo")
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        config = parse((out / model / "config.pbtxt").read_text())
        raw = config.parameters[model_spec.METADATA_PARAMETER].string_value
        assert model_spec.ModelMetadata.from_json(raw) == tiny_model.metadata
        assert (out / model / "1" / config.parameters["model_file"].string_value).exists()
