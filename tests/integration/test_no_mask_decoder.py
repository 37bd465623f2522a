"""The no-mask decoder (``decoder.nomask.onnx``, :class:`samserve_build.graphs.NoMaskDecoderGraph`): the first
transformer layer's image-side projections computed once per image and broadcast over the prompts must give the
masks of the general decoder with ``has_mask_input`` = 0 and of the official ``SamPredictor``; the Triton decoder
model sends runs without mask inputs to it when its config names it (``no_mask_file``).

Tolerances: logits and predicted IoU within a relative error (max |difference| / max |reference|) of
:data:`RELATIVE_ERROR_MAX`, binarized masks IoU >= :data:`MASK_IOU_MIN` for every mask.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samserve.backends import onnx_runner
from samserve.backends.python_model import DecoderModel
from samserve.core import model_spec
from samserve_build import architectures, export, graphs
from samserve_build.evaluation import iou
from samserve_dev.images import synthetic_image
from samserve_dev.served_models import ExportedModel

RELATIVE_ERROR_MAX = 1e-4
MASK_IOU_MIN = 0.999
PROMPTS = [1, 7, 64]
POINTS = [1, 3]
LAYOUTS = [("points", 1), ("points", 3), ("box", 2)]
"""(prompt kind, tokens the client gives) for the official-predictor comparison."""


@pytest.fixture(scope="module")
def sam(tiny_model: ExportedModel):
    torch.set_num_threads(2)
    return architectures.load_sam(tiny_model.variant, tiny_model.checkpoint).eval()


@pytest.fixture(scope="module")
def no_mask_session(tiny_model: ExportedModel):
    return onnx_runner.create_session(tiny_model.directory / model_spec.DECODER_NO_MASK_FILE, intra_op_threads=2)


def assert_masks_match(got_masks: np.ndarray, got_iou: np.ndarray, masks: np.ndarray, ious: np.ndarray,
                       threshold: float) -> None:
    """Logits (N x M x H x W) and predicted IoU (N x M) within RELATIVE_ERROR_MAX, each binarized mask IoU >=
    MASK_IOU_MIN."""
    assert got_masks.shape == masks.shape and got_iou.shape == ious.shape
    assert export.relative_error(got_masks, masks) <= RELATIVE_ERROR_MAX
    assert export.relative_error(got_iou, ious) <= RELATIVE_ERROR_MAX
    overlaps = [iou(a > threshold, b > threshold)
                for a, b in zip(got_masks.reshape(-1, *masks.shape[-2:]), masks.reshape(-1, *masks.shape[-2:]),
                                strict=True)]
    assert min(overlaps) >= MASK_IOU_MIN, f"worst mask IoU {min(overlaps)}"


def point_prompts(meta: model_spec.ModelMetadata, prompts: int, points: int, seed: int) -> dict[str, np.ndarray]:
    """N prompts of P clicks (foreground or background) anywhere in the input and one padding token each, as
    SamPredictor lays out point prompts; a random embedding."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, meta.image_size, size=(prompts, points + 1, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(prompts, points + 1)).astype(np.float32)
    coords[:, -1], labels[:, -1] = 0.0, model_spec.LABEL_PADDING
    return {
        model_spec.DEC_EMBEDDING: rng.standard_normal((1, *meta.embedding_shape), dtype=np.float32),
        model_spec.DEC_POINT_COORDS: coords,
        model_spec.DEC_POINT_LABELS: labels,
    }


def test_the_export_writes_the_no_mask_graph_with_the_contract_names(tiny_model, no_mask_session):
    assert [i.name for i in no_mask_session.get_inputs()] == list(model_spec.NO_MASK_DECODER_INPUTS)
    assert [o.name for o in no_mask_session.get_outputs()] == list(model_spec.DECODER_OUTPUTS)
    coords = no_mask_session.get_inputs()[1]
    assert all(isinstance(d, str) for d in coords.shape[:2])  # dynamic prompts and tokens
    assert model_spec.ModelMetadata.read(tiny_model.directory).exporter_version.startswith(export.EXPORTER_VERSION)


@pytest.mark.parametrize("points", POINTS)
@pytest.mark.parametrize("prompts", PROMPTS)
def test_no_mask_graph_equals_the_decoder_graph_without_mask_input(tiny_model, sam, no_mask_session, prompts, points):
    """Random tokens of every label kind (padding and box corners included) anywhere in the prompt."""
    meta = tiny_model.metadata
    feeds = export.no_mask_decoder_inputs(meta, prompts, points, np.random.default_rng(prompts * 10 + points))
    got = onnx_runner.run(no_mask_session, feeds)
    with torch.no_grad():
        masks, ious = graphs.DecoderGraph(sam).eval()(
            *(torch.from_numpy(feeds[name]) for name in model_spec.NO_MASK_DECODER_INPUTS),
            torch.zeros((prompts, 1, *meta.low_res_mask_size)), torch.zeros(prompts),
        )
    assert_masks_match(got[model_spec.DEC_LOW_RES_MASKS], got[model_spec.DEC_IOU_PREDICTIONS], masks.numpy(),
                       ious.numpy(), meta.mask_threshold)


@pytest.mark.parametrize("points", POINTS)
@pytest.mark.parametrize("prompts", PROMPTS)
def test_no_mask_graph_in_pytorch_equals_the_official_predict_masks(tiny_model, sam, prompts, points):
    """The module itself (before export) against the official MaskDecoder on the official PromptEncoder's tokens."""
    feeds = point_prompts(tiny_model.metadata, prompts, points, seed=prompts + points)
    embedding, coords, labels = (torch.from_numpy(feeds[name]) for name in model_spec.NO_MASK_DECODER_INPUTS)
    with torch.no_grad():
        masks, ious = graphs.NoMaskDecoderGraph(sam).eval()(embedding, coords, labels)
        sparse, dense = sam.prompt_encoder(points=(coords[:, :-1], labels[:, :-1]), boxes=None, masks=None)
        expected_masks, expected_ious = sam.mask_decoder.predict_masks(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
    assert_masks_match(masks.numpy(), ious.numpy(), expected_masks.numpy(), expected_ious.numpy(),
                       tiny_model.metadata.mask_threshold)


def test_image_side_projections_of_the_first_layer_run_once_for_all_prompts(tiny_model, sam):
    """The three prompt-independent projections see one copy of the image tokens (1 x hw x C); the image tokens are
    per prompt (N x hw x C) from the first layer's output on."""
    prompts = 7
    layers = sam.mask_decoder.transformer.layers
    watched = {
        "token_to_image.k_proj": layers[0].cross_attn_token_to_image.k_proj,
        "token_to_image.v_proj": layers[0].cross_attn_token_to_image.v_proj,
        "image_to_token.q_proj": layers[0].cross_attn_image_to_token.q_proj,
        "image_to_token.k_proj": layers[0].cross_attn_image_to_token.k_proj,
        "second_layer.norm1": layers[1].norm1,
        "second_layer.norm4": layers[1].norm4,
    }
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in watched}
    handles = [module.register_forward_hook(lambda _m, args, _out, name=name: shapes[name].append(tuple(args[0].shape)))
               for name, module in watched.items()]
    feeds = export.no_mask_decoder_inputs(tiny_model.metadata, prompts, 2, np.random.default_rng(0))
    try:
        with torch.no_grad():
            graphs.NoMaskDecoderGraph(sam).eval()(
                *(torch.from_numpy(feeds[name]) for name in model_spec.NO_MASK_DECODER_INPUTS))
    finally:
        for handle in handles:
            handle.remove()
    channels, height, width = tiny_model.metadata.embedding_shape
    tokens = 1 + tiny_model.metadata.num_mask_tokens + 2
    assert shapes == {
        "token_to_image.k_proj": [(1, height * width, channels)],
        "token_to_image.v_proj": [(1, height * width, channels)],
        "image_to_token.q_proj": [(1, height * width, channels)],
        "image_to_token.k_proj": [(prompts, tokens, channels)],
        "second_layer.norm1": [(prompts, tokens, channels)],
        "second_layer.norm4": [(prompts, height * width, channels)],
    }


@pytest.fixture(scope="module")
def predictor(sam) -> SamPredictor:
    """The official predictor set to a synthetic 300 x 200 image."""
    official = SamPredictor(sam)
    with torch.no_grad():
        official.set_image(synthetic_image(300, 200, seed=11))
    return official


@pytest.mark.parametrize(("case", "points"), LAYOUTS, ids=[f"{case}{points}" for case, points in LAYOUTS])
@pytest.mark.parametrize("prompts", PROMPTS)
def test_no_mask_graph_equals_the_official_predictor(tiny_model, sam, predictor, no_mask_session, prompts, case,
                                                     points):
    """``SamPredictor.predict_torch`` (official prompt encoder, mask decoder and postprocessing; multimask and single)
    against the no-mask ONNX graph fed the predictor's own embedding, with SamPredictor's token layout (clicks and
    one padding token, or the two box corners)."""
    meta = tiny_model.metadata
    height, width = predictor.original_size
    rng = np.random.default_rng(prompts * 100 + points)
    if case == "points":
        original = rng.uniform(0, 1, size=(prompts, points, 2)) * (width, height)
        coords = predictor.transform.apply_coords(original, predictor.original_size).astype(np.float32)
        labels = rng.integers(0, 2, size=(prompts, points)).astype(np.float32)
        official = dict(point_coords=torch.from_numpy(coords), point_labels=torch.from_numpy(labels))
        # SamPredictor adds one padding token to point prompts without a box.
        coords = np.concatenate([coords, np.zeros((prompts, 1, 2), np.float32)], axis=1)
        labels = np.concatenate([labels, np.full((prompts, 1), model_spec.LABEL_PADDING, np.float32)], axis=1)
    else:
        corners = np.sort(rng.uniform(0, 1, size=(prompts, 2, 2)), axis=1) * (width, height)
        boxes = predictor.transform.apply_boxes(corners.reshape(prompts, 4), predictor.original_size)
        official = dict(point_coords=None, point_labels=None, boxes=torch.from_numpy(boxes.astype(np.float32)))
        coords = boxes.reshape(prompts, 2, 2).astype(np.float32)
        labels = np.tile(np.array([[model_spec.LABEL_BOX_TOP_LEFT, model_spec.LABEL_BOX_BOTTOM_RIGHT]], np.float32),
                         (prompts, 1))
    got = onnx_runner.run(no_mask_session, {
        model_spec.DEC_EMBEDDING: predictor.features.numpy(),
        model_spec.DEC_POINT_COORDS: coords,
        model_spec.DEC_POINT_LABELS: labels,
    })
    logits, scores = got[model_spec.DEC_LOW_RES_MASKS], got[model_spec.DEC_IOU_PREDICTIONS]
    for multimask, tokens in ((True, slice(1, None)), (False, slice(0, 1))):
        with torch.no_grad():
            masks, ious, low_res = predictor.predict_torch(**official, multimask_output=multimask, return_logits=True)
            ours = sam.postprocess_masks(torch.from_numpy(np.ascontiguousarray(logits[:, tokens])),
                                         predictor.input_size, predictor.original_size)
        assert_masks_match(logits[:, tokens], scores[:, tokens], low_res.numpy(), ious.numpy(), meta.mask_threshold)
        assert_masks_match(ours.numpy(), scores[:, tokens], masks.numpy(), ious.numpy(), meta.mask_threshold)


class RecordingRunner:
    """A runner that records the inputs of each run and passes it on."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.runs: list[tuple[str, ...]] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs.append(tuple(feeds))
        return self.runner.run(feeds)

    def close(self) -> None:
        self.runner.close()


def decoder_model(model: ExportedModel, **parameters: str) -> DecoderModel:
    """A DecoderModel initialized as Triton would on the exported folder (ONNX Runtime, 2 threads)."""
    values = {model_spec.METADATA_PARAMETER: model.metadata.to_json(), "model_file": model_spec.DECODER_FILE,
              "intra_op_threads": "2", **parameters}
    config = {"name": model_spec.DECODER_MODEL, "parameters": {k: {"string_value": v} for k, v in values.items()}}
    decoder = DecoderModel()
    decoder.initialize({"model_config": json.dumps(config), "model_repository": str(model.directory.parent),
                        "model_version": model.directory.name})
    return decoder


def test_decoder_model_sends_runs_without_mask_input_to_the_no_mask_graph(tiny_model):
    general = decoder_model(tiny_model, max_prompts_per_run="3")
    switching = decoder_model(tiny_model, max_prompts_per_run="3", no_mask_file=model_spec.DECODER_NO_MASK_FILE)
    assert general.no_mask_runner is None and switching.no_mask_runner is not None
    switching.runner = RecordingRunner(switching.runner)
    switching.no_mask_runner = RecordingRunner(switching.no_mask_runner)
    feeds = export.decoder_inputs(tiny_model.metadata, 7, 3, np.random.default_rng(5))
    feeds[model_spec.DEC_HAS_MASK_INPUT] = np.array([0, 0, 0, 0, 1, 0, 0], np.float32)  # runs: 0-2, 3-5, 6
    expected = general._decode_image(feeds)
    got = switching._decode_image(feeds)
    assert switching.no_mask_runner.runs == [model_spec.NO_MASK_DECODER_INPUTS] * 2
    assert switching.runner.runs == [model_spec.DECODER_INPUTS]
    for name in model_spec.DECODER_OUTPUTS:
        assert got[name].shape == expected[name].shape
        assert export.relative_error(got[name], expected[name]) <= RELATIVE_ERROR_MAX
    switching.finalize()
    general.finalize()
    assert switching.no_mask_runner is None
