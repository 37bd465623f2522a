"""The exporter: graphs checked against PyTorch, metadata measured from the model, external data, repository."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve_build import architectures, export, graphs, repository
from samserve_build.cli import main as build_cli


def test_tiny_export_metadata_is_measured_from_the_model(tiny_model):
    meta = tiny_model.metadata
    arch = architectures.ARCHITECTURES["tiny"]
    assert meta.variant == "tiny"
    assert meta.weights_sha256 == architectures.sha256_file(tiny_model.checkpoint)
    assert meta.image_size == arch.image_size == 256
    assert meta.embedding_shape == (arch.prompt_embed_dim, 16, 16)
    assert meta.low_res_mask_size == (64, 64)
    assert meta.num_mask_tokens == 4 and meta.mask_threshold == 0.0
    assert meta.preprocessing_version == model_spec.PREPROCESSING_VERSION
    assert model_spec.ModelMetadata.read(tiny_model.directory) == meta


def test_graphs_have_the_contract_names_and_dynamic_axes(tiny_model):
    encoder = onnx_runner.create_session(tiny_model.directory / model_spec.ENCODER_FILE)
    decoder = onnx_runner.create_session(tiny_model.directory / model_spec.DECODER_FILE)
    assert [i.name for i in encoder.get_inputs()] == list(model_spec.ENCODER_INPUTS)
    assert [o.name for o in encoder.get_outputs()] == list(model_spec.ENCODER_OUTPUTS)
    assert [i.name for i in decoder.get_inputs()] == list(model_spec.DECODER_INPUTS)
    assert [o.name for o in decoder.get_outputs()] == list(model_spec.DECODER_OUTPUTS)
    assert isinstance(encoder.get_inputs()[0].shape[0], str)  # dynamic batch
    assert all(isinstance(d, str) for d in decoder.get_inputs()[1].shape[:2])  # dynamic prompts and tokens
    # Batches of 3 images and of 7 prompts x 5 tokens run.
    rng = np.random.default_rng(1)
    out = onnx_runner.run(encoder, export.encoder_inputs(tiny_model.metadata, 3, rng))
    assert out[model_spec.ENC_EMBEDDING].shape == (3, *tiny_model.metadata.embedding_shape)
    out = onnx_runner.run(decoder, export.decoder_inputs(tiny_model.metadata, 7, 5, rng))
    assert out[model_spec.DEC_LOW_RES_MASKS].shape == (7, 4, 64, 64)
    assert out[model_spec.DEC_IOU_PREDICTIONS].shape == (7, 4)


def test_padding_is_zero_after_normalization_like_sam_preprocess(tiny_model):
    """The encoder graph must equal Sam.preprocess + image_encoder (padding = 0 in normalized space)."""
    sam = architectures.load_sam("tiny", tiny_model.checkpoint)
    session = onnx_runner.create_session(tiny_model.directory / model_spec.ENCODER_FILE)
    rng = np.random.default_rng(2)
    h, w = 256, 100
    image = np.zeros((1, 256, 256, 3), np.uint8)
    image[0, :h, :w] = rng.integers(0, 256, (h, w, 3))
    with torch.no_grad():
        resized = torch.from_numpy(image[0, :h, :w]).permute(2, 0, 1)[None].float()
        expected = sam.image_encoder(sam.preprocess(resized)).numpy()
    got = onnx_runner.run(session, {model_spec.ENC_IMAGE: image, model_spec.ENC_INPUT_SIZE: np.array([[h, w]])})
    assert export.relative_error(got[model_spec.ENC_EMBEDDING], expected) < 1e-4


def test_check_fails_loudly_when_a_graph_disagrees_with_pytorch(tiny_model):
    sam = architectures.load_sam("tiny", tiny_model.checkpoint)

    class Perturbed(graphs.DecoderGraph):
        def forward(self, *args):
            masks, iou = super().forward(*args)
            return masks * 1.01, iou

    inputs = [export.decoder_inputs(tiny_model.metadata, 2, 3, np.random.default_rng(0))]
    path = tiny_model.directory / model_spec.DECODER_FILE
    errors = export.check_graph(path, graphs.DecoderGraph(sam).eval(), inputs,
                                model_spec.DECODER_INPUTS, model_spec.DECODER_OUTPUTS)
    assert max(errors.values()) < export.RELATIVE_TOLERANCE
    with pytest.raises(export.ExportCheckError, match="low_res_masks relative error"):
        export.check_graph(path, Perturbed(sam).eval(), inputs, model_spec.DECODER_INPUTS, model_spec.DECODER_OUTPUTS)


def test_external_data_export_and_repository(tmp_path):
    """ViT-H's encoder exceeds protobuf's 2 GiB: the same path stores weights in encoder.onnx.data."""
    checkpoint = architectures.write_random_checkpoint("tiny", 5, tmp_path / "tiny.pth")
    result = export.export_model("tiny", checkpoint, tmp_path / "model", force_external_data=True)
    encoder = result.directory / model_spec.ENCODER_FILE
    data = result.directory / (model_spec.ENCODER_FILE + ".data")
    assert data.exists() and data.stat().st_size > encoder.stat().st_size
    proto = onnx.load(str(encoder), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert not [path.name for path in tmp_path.iterdir() if ".staging-" in path.name]  # the export's own, renamed

    repo = repository.write_repository(result.directory, tmp_path / "repo")
    version = repo / model_spec.ENCODER_MODEL / "1"
    assert (version / model_spec.ENCODER_FILE).exists() and (version / data.name).exists()
    assert (version / "model.py").exists()
    config = (repo / model_spec.ENCODER_MODEL / "config.pbtxt").read_text()
    assert f'key: "{model_spec.METADATA_PARAMETER}"' in config
    assert "max_batch_size: 4" in config and "dynamic_batching" in config


def test_cli_writes_a_meta_format_checkpoint_for_the_official_registry(tmp_path):
    """Random vit_b weights in Meta's format load through the official sam_model_registry unchanged."""
    path = tmp_path / "vit_b.pth"
    assert build_cli(["random-checkpoint", "--variant", "vit_b", "--seed", "3", "--out", str(path)]) == 0
    state = torch.load(path, weights_only=True)
    assert "image_encoder.pos_embed" in state and state["image_encoder.pos_embed"].abs().sum() > 0
    sam = architectures.load_sam("vit_b", path)
    assert sam.image_encoder.img_size == 1024
    # Same seed, same bytes-level weights.
    again = architectures.random_state_dict(architectures.ARCHITECTURES["vit_b"], 3)
    assert all(torch.equal(state[k], again[k]) for k in list(state)[:20])


def test_custom_checkpoint_needs_its_architecture(tmp_path):
    path = architectures.write_random_checkpoint("tiny", 0, tmp_path / "mine.pth")
    assert architectures.architecture_for("custom", path) == architectures.ARCHITECTURES["tiny"]
    assert json.loads(path.with_suffix(".json").read_text())["image_size"] == 256
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="architecture"):
        architectures.architecture_for("custom", path)
    with pytest.raises(ValueError, match="unknown SAM variant"):
        architectures.architecture_for("vit_x", None)
