"""The SAM encoder and decoder as Triton python-backend models (targets ``cpu-*`` and ``gpu-torch``).

``model_repository/<target>/sam_*/1/model.py`` import these classes. Which runtime computes the outputs is the
config's ``runtime`` parameter (:data:`RUNTIMES`): ONNX Runtime or OpenVINO on the exported graph, or the official
PyTorch modules (``samserve_build.torch_runtime``, imported only by that target). Each request is validated on its
own: a bad request gets its own ``InferenceResponse(error=...)`` and never fails the rest of the batch. Valid encoder
requests of one ``execute`` call are stacked into one run (Triton's dynamic batching); decoder
requests run per image, that image's prompts in runs of at most ``max_prompts_per_run``.

``triton_python_backend_utils`` exists only inside Triton's python-backend stub, so it is imported lazily.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from samserve.backends import onnx_runner
from samserve.core import model_spec

VALID_LABELS = np.array(
    [
        model_spec.LABEL_PADDING,
        model_spec.LABEL_BACKGROUND,
        model_spec.LABEL_FOREGROUND,
        model_spec.LABEL_BOX_TOP_LEFT,
        model_spec.LABEL_BOX_BOTTOM_RIGHT,
    ],
    dtype=np.float32,
)


class InvalidRequest(ValueError):
    """A request that this model answers with an error response."""


def _pb_utils() -> Any:
    import triton_python_backend_utils as pb_utils  # provided by the python-backend stub

    return pb_utils


def _expect_shape(name: str, array: np.ndarray, expected: tuple[int | None, ...]) -> None:
    """Raise InvalidRequest unless ``array.shape`` matches ``expected`` (None = any size)."""
    ok = array.ndim == len(expected) and all(e is None or e == s for s, e in zip(array.shape, expected, strict=True))
    if not ok:
        layout = " x ".join("*" if e is None else str(e) for e in expected)
        raise InvalidRequest(f"{name} must be {layout}, got {' x '.join(map(str, array.shape))}")


class Runner(Protocol):
    """Computes one model's outputs from its inputs (the names and layouts of :mod:`samserve.core.model_spec`)."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class OnnxRunner:
    """ONNX Runtime on the exported graph at ``path`` (parameters ``execution_providers``, ``intra_op_threads``,
    ``arena_shrinkage``)."""

    def __init__(self, path: Path, parameters: Mapping[str, str]) -> None:
        providers = [p.strip() for p in parameters.get("execution_providers", "").split(",") if p.strip()]
        self.session = onnx_runner.create_session(path, intra_op_threads=int(parameters.get("intra_op_threads", "0")),
                                                   providers=providers or onnx_runner.DEFAULT_PROVIDERS)
        self.shrink_arena = parameters.get("arena_shrinkage", "0") == "1"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return onnx_runner.run(self.session, feeds, shrink_arena=self.shrink_arena)

    def close(self) -> None:
        self.session = None


def create_onnx_runner(path: Path, model: str, parameters: Mapping[str, str], meta: model_spec.ModelMetadata,
                       device_id: int) -> Runner:
    return OnnxRunner(path, parameters)


RUNTIMES: dict[str, str] = {
    "onnxruntime": "samserve.backends.python_model:create_onnx_runner",
    "openvino": "samserve.backends.openvino_runner:create_runner",
    "torch": "samserve_build.torch_runtime:create_runner",
}
"""Config parameter ``runtime`` -> ``module:function(path, model, parameters, metadata, device_id) -> Runner``,
imported when a model loads (PyTorch only where a config asks for it)."""


def create_runner(runtime: str, path: Path, model: str, parameters: Mapping[str, str],
                  meta: model_spec.ModelMetadata, device_id: int) -> Runner:
    if runtime not in RUNTIMES:
        raise RuntimeError(f"{model}: unknown runtime {runtime!r}; one of {sorted(RUNTIMES)}")
    module, function = RUNTIMES[runtime].split(":")
    factory = getattr(importlib.import_module(module), function)
    runner: Runner = factory(path, model, parameters, meta, device_id)
    return runner


class _TritonModel:
    """Shared set-up: config parameters, metadata, the runner of the file the config's ``model_file`` names."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if model_spec.METADATA_PARAMETER not in parameters:
            raise RuntimeError(f"{config['name']}: config lacks the {model_spec.METADATA_PARAMETER} parameter")
        self.metadata = model_spec.ModelMetadata.from_json(parameters[model_spec.METADATA_PARAMETER])
        self.max_prompts_per_run = int(parameters.get("max_prompts_per_run", "0"))
        if "model_file" not in parameters:
            raise RuntimeError(f"{config['name']}: config lacks the model_file parameter (the file to load)")
        self.name, self.parameters = config["name"], parameters
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.device_id = int(args.get("model_instance_device_id", "0") or 0)
        self.runner = self._load(parameters["model_file"])

    def _load(self, model_file: str) -> Runner:
        """A runner of ``model_file`` (in the version folder) with the config's runtime and parameters."""
        return create_runner(self.parameters.get("runtime", "onnxruntime"), self.version_dir / model_file, self.name,
                             self.parameters, self.metadata, self.device_id)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(feeds)

    def _error(self, message: str, invalid_argument: bool = True) -> Any:
        """An error response for one request: INVALID_ARG for a bad request, INTERNAL for a runtime failure."""
        pb_utils = _pb_utils()
        code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self) -> None:
        self.runner.close()


class EncoderModel(_TritonModel):
    """image (uint8 B x S x S x 3) + input_size (int64 B x 2) -> image_embeddings (float32 B x C x h x w)."""

    def _inputs(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        pb_utils = _pb_utils()
        size = self.metadata.image_size
        image = pb_utils.get_input_tensor_by_name(request, model_spec.ENC_IMAGE).as_numpy()
        input_size = pb_utils.get_input_tensor_by_name(request, model_spec.ENC_INPUT_SIZE).as_numpy()
        _expect_shape(model_spec.ENC_IMAGE, image, (None, size, size, 3))
        _expect_shape(model_spec.ENC_INPUT_SIZE, input_size, (image.shape[0], 2))
        if np.any(input_size < 1) or np.any(input_size > size):
            raise InvalidRequest(f"{model_spec.ENC_INPUT_SIZE} must lie in [1, {size}], got {input_size.tolist()}")
        return image, input_size.astype(np.int64)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb_utils()
        responses: list[Any] = [None] * len(requests)
        valid: list[tuple[int, np.ndarray, np.ndarray]] = []
        for index, request in enumerate(requests):
            try:
                valid.append((index, *self._inputs(request)))
            except InvalidRequest as error:
                responses[index] = self._error(str(error))
        if valid:
            images = np.concatenate([item[1] for item in valid])
            sizes = np.concatenate([item[2] for item in valid])
            try:
                embeddings = self._run({model_spec.ENC_IMAGE: images, model_spec.ENC_INPUT_SIZE: sizes})[
                    model_spec.ENC_EMBEDDING]
            except Exception as error:  # noqa: BLE001 - the runtime's failure becomes each request's error
                for index, _, _ in valid:
                    responses[index] = self._error(f"encoder failed: {error}", invalid_argument=False)
                return responses
            start = 0
            for index, image, _ in valid:
                part = embeddings[start : start + image.shape[0]]
                start += image.shape[0]
                tensor = pb_utils.Tensor(model_spec.ENC_EMBEDDING, np.ascontiguousarray(part))
                responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses


class DecoderModel(_TritonModel):
    """B x (one embedding + N prompts) -> low_res_masks (B x N x M x 4h x 4w), iou_predictions (B x N x M).

    An image's prompts run in chunks of ``max_prompts_per_run`` (config parameter; 0 = all at once): ONNX Runtime's
    working memory grows with the prompts of one run (vit_b: 3.6 GB peak for 64 prompts, 1.0 GB for 16) while
    the time per prompt hardly changes.

    With the config parameter ``no_mask_file`` (a file in the version folder, e.g.
    :data:`model_spec.DECODER_NO_MASK_FILE`) a run whose ``has_mask_input`` is all 0 goes to a second runner of that
    file, fed only ``image_embeddings`` (1 x C x h x w), ``point_coords`` (N x P x 2) and ``point_labels`` (N x P):
    the no-mask graph does the image-side work of the first transformer layer once per run instead of per prompt.
    """

    no_mask_runner: Runner | None = None

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        no_mask_file = self.parameters.get("no_mask_file", "").strip()
        self.no_mask_runner = self._load(no_mask_file) if no_mask_file else None

    def _run_prompts(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run of one image's prompts: the no-mask runner when there is one and no prompt has a mask input."""
        if self.no_mask_runner is not None and not np.any(feeds[model_spec.DEC_HAS_MASK_INPUT]):
            return self.no_mask_runner.run({name: feeds[name] for name in model_spec.NO_MASK_DECODER_INPUTS})
        return self._run(feeds)

    def _decode_image(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One image's prompts (embedding 1 x C x h x w, the rest N x ...) -> outputs N x ..."""
        prompts = feeds[model_spec.DEC_POINT_COORDS].shape[0]
        step = self.max_prompts_per_run or prompts
        if prompts <= step:
            return self._run_prompts(feeds)
        parts = [
            self._run_prompts({name: value if name == model_spec.DEC_EMBEDDING else value[start : start + step]
                               for name, value in feeds.items()})
            for start in range(0, prompts, step)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in model_spec.DECODER_OUTPUTS}

    def finalize(self) -> None:
        super().finalize()
        if self.no_mask_runner is not None:
            self.no_mask_runner.close()
            self.no_mask_runner = None

    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        pb_utils = _pb_utils()
        feeds = {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in model_spec.DECODER_INPUTS
        }
        meta = self.metadata
        embeddings = feeds[model_spec.DEC_EMBEDDING]
        _expect_shape(model_spec.DEC_EMBEDDING, embeddings, (None, *meta.embedding_shape))
        batch = embeddings.shape[0]
        coords = feeds[model_spec.DEC_POINT_COORDS]
        _expect_shape(model_spec.DEC_POINT_COORDS, coords, (batch, None, None, 2))
        prompts, tokens = coords.shape[1], coords.shape[2]
        if prompts < 1 or tokens < 1:
            raise InvalidRequest("a decoder request needs at least one prompt with at least one point token")
        labels = feeds[model_spec.DEC_POINT_LABELS]
        _expect_shape(model_spec.DEC_POINT_LABELS, labels, (batch, prompts, tokens))
        _expect_shape(model_spec.DEC_MASK_INPUT, feeds[model_spec.DEC_MASK_INPUT],
                      (batch, prompts, 1, *meta.low_res_mask_size))
        has_mask = feeds[model_spec.DEC_HAS_MASK_INPUT]
        _expect_shape(model_spec.DEC_HAS_MASK_INPUT, has_mask, (batch, prompts))
        if not np.all(np.isfinite(coords)):
            raise InvalidRequest(f"{model_spec.DEC_POINT_COORDS} must be finite")
        if not np.all(np.isin(labels, VALID_LABELS)):
            raise InvalidRequest(f"{model_spec.DEC_POINT_LABELS} must be one of {VALID_LABELS.tolist()}")
        if not np.all((has_mask == 0) | (has_mask == 1)):
            raise InvalidRequest(f"{model_spec.DEC_HAS_MASK_INPUT} must be 0 or 1")
        return feeds

    def execute(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb_utils()
        responses = []
        for request in requests:
            try:
                feeds = self._inputs(request)
            except InvalidRequest as error:
                responses.append(self._error(str(error)))
                continue
            try:
                per_image = [
                    self._decode_image({
                        name: (feeds[name][b : b + 1] if name == model_spec.DEC_EMBEDDING else feeds[name][b])
                        for name in model_spec.DECODER_INPUTS
                    })
                    for b in range(feeds[model_spec.DEC_EMBEDDING].shape[0])
                ]
            except Exception as error:  # noqa: BLE001 - the runtime's failure becomes this request's error
                responses.append(self._error(f"decoder failed: {error}", invalid_argument=False))
                continue
            outputs = [  # one image per request is the common case: a view, not a copy of the logits
                pb_utils.Tensor(name, per_image[0][name][None] if len(per_image) == 1
                                else np.stack([result[name] for result in per_image]))
                for name in model_spec.DECODER_OUTPUTS
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
