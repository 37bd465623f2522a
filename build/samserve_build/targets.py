"""Serving targets: how the two SAM models run inside Triton. A registry, as ``ARCHITECTURES`` is for variants.

A target names its model-config templates (``model_repository/<name>/``) and, per Triton model, the file that goes
into version 1 (the config's ``model_file`` parameter names the same file: a test checks they agree). That file is
an exported graph, a graph derived from one (:data:`DERIVED_FILES`), or the checkpoint itself
(:data:`samserve.core.model_spec.CHECKPOINT_FILE`). The gateway needs nothing of this: request layout, dtypes and sizes
come from the served configs and metadata, and every target serves the same tensor names.

| target | encoder | decoder |
| --- | --- | --- |
| cpu-onnxruntime | ONNX Runtime (fp32) in the python backend | same |
| cpu-openvino | OpenVINO's CPU plugin (fp32) in the python backend | same |
| cpu-openvino-bf16 | OpenVINO's CPU plugin in bf16 (CPUs with AVX-512-bf16 or AMX) | OpenVINO, fp32 |
| gpu-torch | official PyTorch modules on CUDA, bf16 autocast, SDPA, batched | same modules, bf16 |
| gpu-tensorrt | TensorRT plan of the mixed-precision (fp16) graph | TensorRT plan of the fp32 graph |

``auto`` is no target of its own: :mod:`samserve_build.cpu_choice` resolves it per machine to the fastest encoder
and the fastest decoder of :data:`CPU_TARGETS` (:func:`composed` when they come from different targets).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from pathlib import Path

from samserve.core import model_spec


class ServingTargetName(enum.StrEnum):
    CPU_ONNXRUNTIME = "cpu-onnxruntime"
    CPU_OPENVINO = "cpu-openvino"
    CPU_OPENVINO_BF16 = "cpu-openvino-bf16"
    GPU_TORCH = "gpu-torch"
    GPU_TENSORRT = "gpu-tensorrt"
    AUTO = "auto"
    """The fastest CPU target on this machine (:func:`samserve_build.cpu_choice.resolve`)."""


def _write_fp16_encoder(model_dir: Path, destination: Path, meta: model_spec.ModelMetadata) -> None:
    from samserve_build import precision

    precision.write_mixed_precision(model_dir / model_spec.ENCODER_FILE, destination, precision.Precision.FP16)


def _write_batched_decoder(model_dir: Path, destination: Path, meta: model_spec.ModelMetadata) -> None:
    from samserve_build import tensorrt

    tensorrt.write_batched_decoder(model_dir / model_spec.DECODER_FILE, destination, meta)


FP16_ENCODER_FILE = "encoder.fp16.onnx"
"""``samserve_build.precision.mixed_precision_file(ENCODER_FILE, FP16)``: the TensorRT encoder's source."""
BATCHED_DECODER_FILE = "decoder.batched.onnx"
"""The TensorRT decoder's source: the decoder graph with a prompt batch axis
(:func:`samserve_build.tensorrt.write_batched_decoder`)."""

DERIVED_FILES: dict[str, Callable[[Path, Path, model_spec.ModelMetadata], None]] = {
    FP16_ENCODER_FILE: _write_fp16_encoder,
    BATCHED_DECODER_FILE: _write_batched_decoder,
}
"""Files a target serves that the exporter does not write: name -> writer(export folder, destination, metadata).
Written once into the export folder (beside the graphs they come from) when a repository first needs them."""


def _write_engine_script(repository: Path, meta: model_spec.ModelMetadata, tensorrt_major: int) -> None:
    from samserve_build import tensorrt

    tensorrt.write_script(repository, meta, FP16_ENCODER_FILE, BATCHED_DECODER_FILE, tensorrt_major)


NO_MASK_DECODER = {model_spec.DECODER_MODEL: (model_spec.DECODER_NO_MASK_FILE,)}
"""The decoder graph of runs without mask inputs, beside the decoder's (its config's ``no_mask_file``)."""


@dataclasses.dataclass(frozen=True)
class ServingTarget:
    name: ServingTargetName
    description: str
    model_files: Mapping[str, str]
    """Triton model name -> the file placed in version 1 (external data beside it comes along)."""
    extra_files: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Triton model name -> more files of the export placed beside its model file (a config parameter names each)."""
    exact_dims: bool = False
    """Render every tensor's dims from the metadata (TensorRT plans have fixed sizes that the config must repeat)."""
    finish: Callable[[Path, model_spec.ModelMetadata, int], None] | None = None
    """Writes what the rendered repository needs besides its models (repository, metadata, TensorRT major)."""
    template_folders: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Triton model name -> folder of its template inside ``model_repository/`` when another target's (unset: the
    target's name)."""
    parameters: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    """Triton model name -> config parameters this target sets in its template (before the caller's)."""
    native_flags: tuple[str, ...] = ()
    """CPU flags of which one must be present for this target to run at speed (empty: any CPU)."""
    components: Mapping[str, ServingTargetName] = dataclasses.field(default_factory=dict)
    """Of a :func:`composed` target: Triton model name -> the registered target it runs that model as."""

    @property
    def label(self) -> str:
        """The name, or for a composed target which target runs each model."""
        if not self.components:
            return self.name.value
        return ", ".join(f"{model} as {target}" for model, target in self.components.items())

    def template(self, model: str) -> str:
        """Folder of ``model``'s template inside ``model_repository/``."""
        return self.template_folders.get(model, self.name.value)

    @property
    def needs_checkpoint(self) -> bool:
        return model_spec.CHECKPOINT_FILE in self.model_files.values()


SERVING_TARGETS: dict[ServingTargetName, ServingTarget] = {
    ServingTargetName.CPU_ONNXRUNTIME: ServingTarget(
        name=ServingTargetName.CPU_ONNXRUNTIME,
        description="ONNX Runtime (CPU execution provider, fp32) inside Triton's python backend",
        model_files={model_spec.ENCODER_MODEL: model_spec.ENCODER_FILE,
                     model_spec.DECODER_MODEL: model_spec.DECODER_FILE},
        extra_files=NO_MASK_DECODER,
    ),
    ServingTargetName.CPU_OPENVINO: ServingTarget(
        name=ServingTargetName.CPU_OPENVINO,
        description="OpenVINO's CPU plugin (fp32) inside Triton's python backend",
        model_files={model_spec.ENCODER_MODEL: model_spec.ENCODER_FILE,
                     model_spec.DECODER_MODEL: model_spec.DECODER_FILE},
        extra_files=NO_MASK_DECODER,
    ),
    ServingTargetName.CPU_OPENVINO_BF16: ServingTarget(
        name=ServingTargetName.CPU_OPENVINO_BF16,
        description="OpenVINO's CPU plugin inside Triton's python backend, the encoder in bf16 (CPUs with native "
                    "bf16), the decoder in fp32",
        model_files={model_spec.ENCODER_MODEL: model_spec.ENCODER_FILE,
                     model_spec.DECODER_MODEL: model_spec.DECODER_FILE},
        extra_files=NO_MASK_DECODER,
        template_folders=dict.fromkeys((model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL),
                                       ServingTargetName.CPU_OPENVINO.value),
        parameters={model_spec.ENCODER_MODEL: {model_spec.PRECISION_PARAMETER: "bf16"}},
        native_flags=("avx512_bf16", "amx_bf16"),
    ),
    ServingTargetName.GPU_TORCH: ServingTarget(
        name=ServingTargetName.GPU_TORCH,
        description="the official PyTorch modules on CUDA (bf16 autocast, SDPA, batched) in Triton's python backend",
        model_files={model_spec.ENCODER_MODEL: model_spec.CHECKPOINT_FILE,
                     model_spec.DECODER_MODEL: model_spec.CHECKPOINT_FILE},
    ),
    ServingTargetName.GPU_TENSORRT: ServingTarget(
        name=ServingTargetName.GPU_TENSORRT,
        description="TensorRT plans (fp16 encoder with fp32 LayerNorm/Softmax/neck, fp32 decoder) built on the "
                    "serving GPU by the repository's build_engines.sh",
        model_files={model_spec.ENCODER_MODEL: FP16_ENCODER_FILE,
                     model_spec.DECODER_MODEL: BATCHED_DECODER_FILE},
        exact_dims=True,
        finish=_write_engine_script,
    ),
}

def serving_target(target: ServingTarget | ServingTargetName | str) -> ServingTarget:
    """The registered target of a name (a target itself is returned as it is)."""
    if isinstance(target, ServingTarget):
        return target
    if ServingTargetName(target) not in SERVING_TARGETS:
        raise ValueError(f"{target} names no target of its own: resolve it first (samserve_build.cpu_choice)")
    return SERVING_TARGETS[ServingTargetName(target)]


def composed(encoder: ServingTargetName, decoder: ServingTargetName) -> ServingTarget:
    """A target running the encoder as target ``encoder`` does and the decoder as ``decoder`` does (templates, files
    and parameters of each): what ``auto`` renders when the fastest of each differ. Both must serve the exported
    graphs' files (the CPU targets)."""
    if encoder == decoder:
        return SERVING_TARGETS[encoder]
    sources = {model_spec.ENCODER_MODEL: SERVING_TARGETS[encoder], model_spec.DECODER_MODEL: SERVING_TARGETS[decoder]}
    return ServingTarget(
        name=ServingTargetName.AUTO,
        description=f"the encoder as {encoder} runs it, the decoder as {decoder} runs it",
        model_files={model: source.model_files[model] for model, source in sources.items()},
        extra_files={model: source.extra_files[model] for model, source in sources.items()
                     if model in source.extra_files},
        template_folders={model: source.template(model) for model, source in sources.items()},
        parameters={model: source.parameters[model] for model, source in sources.items() if model in source.parameters},
        components={model_spec.ENCODER_MODEL: encoder, model_spec.DECODER_MODEL: decoder},
    )


CPU_TARGETS = (ServingTargetName.CPU_ONNXRUNTIME, ServingTargetName.CPU_OPENVINO, ServingTargetName.CPU_OPENVINO_BF16)
"""What ``auto`` chooses among (fp32 first: the choice when a reduced precision is not faster)."""
