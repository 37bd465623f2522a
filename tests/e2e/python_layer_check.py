"""Run inside a clean venv that holds exactly what the GPU Triton image installs
(tests/e2e/test_gpu_python_layer.py): import every entry of ``samserve.backends.python_model.RUNTIMES``, then
load each model of each given repository as Triton's python backend does (``initialize`` with the config as
Triton passes it) and run its runner once.

Usage: ``python python_layer_check.py OUT.json TARGET=REPOSITORY ...``. Writes, per runtime, whether it imported
(or the error), and per target and model the output shapes, their digests and the encoder output itself (.npy beside
OUT.json) so the caller can compare the runtimes with each other. Needs neither torch nor the checkout.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from samserve.backends import python_model
from samserve.core import model_spec


def config_json(model_dir: Path) -> str:
    """The model config as Triton hands it to ``initialize`` (JSON, proto field names)."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def load(model_class: type, repository: Path, name: str) -> python_model._TritonModel:
    model = model_class()
    model.initialize({"model_config": config_json(repository / name), "model_repository": str(repository / name),
                      "model_version": "1", "model_instance_device_id": "0"})
    return model


def run_target(repository: Path) -> tuple[dict[str, object], np.ndarray]:
    encoder = load(python_model.EncoderModel, repository, model_spec.ENCODER_MODEL)
    decoder = load(python_model.DecoderModel, repository, model_spec.DECODER_MODEL)
    meta = encoder.metadata
    size = meta.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    embedding = encoder.runner.run({model_spec.ENC_IMAGE: image,
                                    model_spec.ENC_INPUT_SIZE: np.array([[size, size * 3 // 4]], np.int64)})[
        model_spec.ENC_EMBEDDING]
    low_res = 4 * embedding.shape[-1]
    outputs = decoder.runner.run({
        model_spec.DEC_EMBEDDING: embedding[:1],
        model_spec.DEC_POINT_COORDS: np.array([[[size / 3, size / 4], [0, 0]]], np.float32),
        model_spec.DEC_POINT_LABELS: np.array([[1, -1]], np.float32),
        model_spec.DEC_MASK_INPUT: np.zeros((1, 1, low_res, low_res), np.float32),
        model_spec.DEC_HAS_MASK_INPUT: np.zeros((1,), np.float32),
    })
    masks = outputs[model_spec.DEC_LOW_RES_MASKS]
    result = {
        "runtimes": {m: load_runtime_name(repository, m) for m in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)},
        "embedding_shape": list(embedding.shape),
        "low_res_masks_shape": list(masks.shape),
        "finite": bool(np.isfinite(embedding).all() and np.isfinite(masks).all()),
    }
    encoder.finalize()
    decoder.finalize()
    return result, embedding


def load_runtime_name(repository: Path, name: str) -> str:
    parameters = json.loads(config_json(repository / name)).get("parameters", {})
    return str(parameters.get("runtime", {}).get("string_value", "onnxruntime"))


def main() -> None:
    out = Path(sys.argv[1])
    report: dict[str, object] = {"python": sys.version.split()[0], "imports": {}, "targets": {}}
    for runtime, entry in python_model.RUNTIMES.items():
        module = entry.split(":")[0]
        try:
            importlib.import_module(module)
            report["imports"][runtime] = "ok"  # type: ignore[index]
        except ImportError as error:
            report["imports"][runtime] = f"ImportError: {error}"  # type: ignore[index]
    report["onnx_imported"] = "onnx" in sys.modules
    for argument in sys.argv[2:]:
        target, repository = argument.split("=", 1)
        summary, embedding = run_target(Path(repository))
        np.save(out.with_name(f"{target}-embedding.npy"), embedding)
        report["targets"][target] = summary  # type: ignore[index]
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
