"""TensorRT engines for the ``gpu-tensorrt`` serving target: the graphs TensorRT builds from, the ``trtexec``
commands, and the record of each built plan.

TensorRT's builder cannot be installed where this project is developed or tested (docs/gpu.md), and
a plan runs only on the GPU architecture and TensorRT version that built it. So ``samserve-build repository
--target gpu-tensorrt`` renders a repository holding the ONNX sources and a script, ``build_engines.sh``, that a
machine with ``trtexec`` and the serving GPU runs (the chart's ``tensorrtEngines`` Job, in NVIDIA's TensorRT
container of Triton's release; or ``samserve-build tensorrt --repository DIR`` where ``trtexec`` is installed).
For each model the script

1. checks that ``trtexec`` is the TensorRT major version the commands were written for (10 or 11) and, when the
   environment names them (the chart's Job does), the exact TensorRT version (``EXPECTED_TENSORRT_VERSION``, e.g.
   ``10.7`` or ``10.7.0``) and the GPU's compute capability (``EXPECTED_COMPUTE_CAPABILITY``) that Triton's pods
   wait for,
2. drops the model's record of this GPU architecture, then its plan (record and plan go together: a config never
   names a plan that is missing or left from another build, even when the build below fails),
3. builds ``<version>/model_cc<major><minor>.plan`` from the model's ONNX source with the profiles below and a
   timing cache shared by both builds (repeated builds take minutes less),
4. records the plan (GPU name, compute capability, TensorRT version) in the model's config as the parameter
   ``samserve_engine_cc<major><minor>`` (:class:`samserve.core.model_spec.EngineRecord`). The config's
   ``cc_model_filenames`` already maps each compute capability to the plan of that name, so one repository serves
   a mixed fleet once the Job ran on each GPU kind.

Sources (tensor names: :mod:`samserve.core.model_spec`, unchanged, so the gateway does not know which target runs):

* encoder: the mixed-precision graph (:mod:`samserve_build.precision`, fp16 with LayerNorm, Softmax and the neck
  in fp32): TensorRT 11 builds only strongly typed networks, so precision lives in the graph, never in flags.
  Profile: images 1..8 (Triton's dynamic batching), optimum at the largest batch.
* decoder: the fp32 graph with a leading batch axis of one image (:func:`write_batched_decoder`): a plan's first
  axis is Triton's batch axis when ``max_batch_size`` > 0, while the exported decoder takes one embedding and N
  prompts. A plan rather than ONNX Runtime's TensorRT execution provider: one build step for both models, plans
  recorded the same way, and CUDA graphs in Triton apply to the TensorRT backend only. Profile: prompts 1..64 x
  point tokens 1..16.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from samserve.core import model_spec

LOG = logging.getLogger(__name__)

SCRIPT_FILE = "build_engines.sh"
"""The engine-build script, at the top of a rendered gpu-tensorrt repository."""
TIMING_CACHE_FILE = "tensorrt.timing-cache"
PLAN_STEM = "model"
COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
"""GPU architectures the configs map to plans (T4, A100, A10, L4/L40S, H100/H200, B200, RTX PRO 6000 Blackwell);
a plan exists only for those the engine build ran on."""

MAX_ENCODER_BATCH = 8
"""Images per encoder run (the encoder config's ``max_batch_size``)."""
MAX_PROMPTS = 64
MAX_POINT_TOKENS = 16
OPT_PROMPTS = 16
OPT_POINT_TOKENS = 2
"""The decoder profile's optimum: segment-everything batches (many prompts of one point and its padding)."""


def plan_file(compute_capability: str) -> str:
    """``model_cc90.plan`` for compute capability ``9.0``."""
    return f"{PLAN_STEM}_cc{compute_capability.replace('.', '')}.plan"


@dataclasses.dataclass(frozen=True)
class TensorRtRelease:
    """What differs between TensorRT majors on the ``trtexec`` command line."""

    major: int
    flags: tuple[str, ...]
    """Flags added to every build."""


TENSORRT_RELEASES: dict[int, TensorRtRelease] = {
    # 10.x: strong typing is opt-in (precision comes from the graph, no --fp16).
    10: TensorRtRelease(10, ("--stronglyTyped",)),
    # 11.x: every network is strongly typed; the precision flags are gone and --stronglyTyped is a no-op.
    11: TensorRtRelease(11, ()),
}


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One plan to build: its model, ONNX source (in the model's version folder) and optimization profile."""

    model: str
    source: str
    shapes: Mapping[str, Sequence[tuple[int, ...]]]
    """Input name -> its (min, opt, max) shapes, batch axis included."""

    def shape_flags(self) -> list[str]:
        def joined(index: int) -> str:
            return ",".join(f"{name}:{'x'.join(map(str, dims[index]))}" for name, dims in self.shapes.items())

        return [f"--minShapes={joined(0)}", f"--optShapes={joined(1)}", f"--maxShapes={joined(2)}"]


def engine_specs(meta: model_spec.ModelMetadata, encoder_source: str,
                 decoder_source: str) -> tuple[EngineSpec, EngineSpec]:
    """The encoder's and decoder's plans for a model of ``meta``'s sizes (S, C x h x w, 4h x 4w), built from the
    graphs named ``encoder_source`` and ``decoder_source`` (the serving target's files)."""
    size = meta.image_size
    channels, height, width = meta.embedding_shape
    low_res = meta.low_res_mask_size

    def images(count: int) -> tuple[int, ...]:
        return (count, size, size, 3)

    encoder = EngineSpec(model_spec.ENCODER_MODEL, encoder_source, {
        model_spec.ENC_IMAGE: (images(1), images(MAX_ENCODER_BATCH), images(MAX_ENCODER_BATCH)),
        model_spec.ENC_INPUT_SIZE: ((1, 2), (MAX_ENCODER_BATCH, 2), (MAX_ENCODER_BATCH, 2)),
    })
    prompts = ((1, 1), (OPT_PROMPTS, OPT_POINT_TOKENS), (MAX_PROMPTS, MAX_POINT_TOKENS))
    decoder = EngineSpec(model_spec.DECODER_MODEL, decoder_source, {
        model_spec.DEC_EMBEDDING: ((1, channels, height, width),) * 3,
        model_spec.DEC_POINT_COORDS: tuple((1, n, p, 2) for n, p in prompts),
        model_spec.DEC_POINT_LABELS: tuple((1, n, p) for n, p in prompts),
        model_spec.DEC_MASK_INPUT: tuple((1, n, 1, *low_res) for n, _ in prompts),
        model_spec.DEC_HAS_MASK_INPUT: tuple((1, n) for n, _ in prompts),
    })
    return encoder, decoder


def trtexec_command(spec: EngineSpec, version_dir: str, plan: str, release: TensorRtRelease,
                    timing_cache: str, trtexec: str = "trtexec") -> list[str]:
    """The ``trtexec`` build of one plan (paths as given: the script passes shell variables)."""
    return [
        trtexec, f"--onnx={version_dir}/{spec.source}", f"--saveEngine={version_dir}/{plan}",
        *spec.shape_flags(), f"--timingCacheFile={timing_cache}", "--skipInference", *release.flags,
    ]


def triton_dims(meta: model_spec.ModelMetadata) -> dict[str, dict[str, list[int]]]:
    """Model -> tensor -> the exact dims (batch axis excluded) a plan of ``meta``'s sizes has: Triton refuses a
    config whose ``-1`` stands where the plan has a fixed size. -1 = prompts or point tokens."""
    size, (channels, height, width), low_res = meta.image_size, meta.embedding_shape, meta.low_res_mask_size
    masks = meta.num_mask_tokens
    return {
        model_spec.ENCODER_MODEL: {
            model_spec.ENC_IMAGE: [size, size, 3],
            model_spec.ENC_INPUT_SIZE: [2],
            model_spec.ENC_EMBEDDING: [channels, height, width],
        },
        model_spec.DECODER_MODEL: {
            model_spec.DEC_EMBEDDING: [channels, height, width],
            model_spec.DEC_POINT_COORDS: [-1, -1, 2],
            model_spec.DEC_POINT_LABELS: [-1, -1],
            model_spec.DEC_MASK_INPUT: [-1, 1, *low_res],
            model_spec.DEC_HAS_MASK_INPUT: [-1],
            model_spec.DEC_LOW_RES_MASKS: [-1, masks, *low_res],
            model_spec.DEC_IOU_PREDICTIONS: [-1, masks],
        },
    }


def with_exact_dims(config_text: str, dims: Mapping[str, list[int]]) -> str:
    """``config_text`` (a config.pbtxt) with every tensor's dims set from ``dims`` (re-serialized: comments go)."""
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    for tensor in [*config.input, *config.output]:
        del tensor.dims[:]
        tensor.dims.extend(dims[tensor.name])
    return text_format.MessageToString(config)


def write_batched_decoder(source: Path, destination: Path, meta: model_spec.ModelMetadata) -> Path:
    """The exported decoder (one embedding 1 x C x h x w, N prompts) behind a leading batch axis of one image:
    inputs 1 x C x h x w, 1 x N x P x 2, 1 x N x P, 1 x N x 1 x 4h x 4w, 1 x N; outputs 1 x N x M x 4h x 4w and
    1 x N x M. Squeeze/Unsqueeze around the unchanged graph, so it computes exactly what the decoder does."""
    model = onnx.load(str(source))
    graph = model.graph
    axis = helper.make_tensor("samserve_batch_axis", TensorProto.INT64, [1], [0])
    graph.initializer.append(axis)
    squeezes, unsqueezes = [], []
    batched_inputs, batched_outputs = [], []
    for value in graph.input:
        inner = f"{value.name}__one_image"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        if value.name == model_spec.DEC_EMBEDDING:  # already 1 x C x h x w: the batch axis is its first
            for node in graph.node:
                node.input[:] = [value.name if name == inner else name for name in node.input]
            batched_inputs.append(value)
            continue
        squeezes.append(helper.make_node("Squeeze", [value.name, axis.name], [inner], name=f"{inner}_squeeze"))
        batched = onnx.ValueInfoProto()
        batched.CopyFrom(value)
        batched.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
        batched_inputs.append(batched)
    dims = triton_dims(meta)[model_spec.DECODER_MODEL]
    for value in graph.output:
        inner = f"{value.name}__one_image"
        for node in graph.node:
            node.output[:] = [inner if name == value.name else name for name in node.output]
        unsqueezes.append(helper.make_node("Unsqueeze", [inner, axis.name], [value.name],
                                           name=f"{inner}_unsqueeze"))
        shape = [1, *[("prompts" if d == -1 else d) for d in dims[value.name]]]
        batched_outputs.append(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, shape))
    nodes = [*squeezes, *graph.node, *unsqueezes]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(batched_inputs)
    del graph.output[:]
    graph.output.extend(batched_outputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(destination))
    return destination


_RECORD_FORMAT = ('{\\\\"compute_capability\\\\": \\\\"%s\\\\", \\\\"gpu_name\\\\": \\\\"%s\\\\", '
                  '\\\\"plan\\\\": \\\\"%s\\\\", \\\\"tensorrt_version\\\\": \\\\"%s\\\\"}')
"""printf format (single-quoted in bash) of an :class:`~samserve.core.model_spec.EngineRecord` inside a pbtxt string."""


def _shell_word(argument: str) -> str:
    """One argument for bash: double-quoted where it expands a variable of the script, else quoted as needed."""
    return f'"{argument}"' if "$" in argument else shlex.quote(argument)


def _config_path(model: str) -> str:
    return f'"$repo/{model}/config.pbtxt"'


def build_script(meta: model_spec.ModelMetadata, encoder_source: str, decoder_source: str,
                 tensorrt_major: int) -> str:
    """``build_engines.sh`` for a repository of ``meta``'s model: run it on the GPU that will serve, with
    ``trtexec`` on the PATH (or ``TRTEXEC=/path/to/trtexec``); it takes the repository as its only argument
    (default: its own folder)."""
    release = TENSORRT_RELEASES[tensorrt_major]
    lines = [
        "#!/usr/bin/env bash",
        "# Written by `samserve-build repository --target gpu-tensorrt` (samserve_build.tensorrt): builds this",
        "# repository's TensorRT plans on this machine's GPU and records them in the configs. Idempotent.",
        "set -euo pipefail",
        'repo="$(cd "${1:-$(dirname "$0")}" && pwd)"',
        'trtexec="${TRTEXEC:-trtexec}"',
        'gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"',
        'cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d " ")"',
        "# trtexec prints its version as [TensorRT v100700] (10.7.0) at the start of every run.",
        'banner="$("$trtexec" --help 2>&1 | head -n 5 || true)"',
        'encoded="$(sed -n "s/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p" <<<"$banner" | head -n 1)"',
        'if [ -z "$encoded" ]; then echo "cannot read TensorRT\'s version from $trtexec" >&2; exit 2; fi',
        'tensorrt="$((encoded / 10000)).$((encoded / 100 % 100)).$((encoded % 100))"',
        f'if [ "$((encoded / 10000))" != "{release.major}" ]; then',
        f'  echo "these commands are for TensorRT {release.major}.x, $trtexec is $tensorrt: render the repository'
        f' with --tensorrt-major $((encoded / 10000))" >&2; exit 2',
        "fi",
        "# The chart's Job names what Triton's pods wait for: another TensorRT or GPU would build plans never served.",
        'expected="${EXPECTED_TENSORRT_VERSION:-}"',
        'if [ -n "$expected" ] && [[ "$tensorrt." != "$expected."* ]]; then',
        '  echo "expected TensorRT $expected (EXPECTED_TENSORRT_VERSION), $trtexec is $tensorrt" >&2; exit 2',
        "fi",
        'if [ -n "${EXPECTED_COMPUTE_CAPABILITY:-}" ] && [ "$cc" != "$EXPECTED_COMPUTE_CAPABILITY" ]; then',
        '  echo "expected compute capability $EXPECTED_COMPUTE_CAPABILITY (EXPECTED_COMPUTE_CAPABILITY), $gpu is $cc"'
        ' >&2; exit 2',
        "fi",
        'case "$cc" in',
        *[f"  {capability}) ;;" for capability in COMPUTE_CAPABILITIES],
        '  *) echo "compute capability $cc is not in the configs\' cc_model_filenames" >&2; exit 2 ;;',
        "esac",
        'plan="' + PLAN_STEM + '_cc${cc//./}.plan"',
        f'cache="$repo/{TIMING_CACHE_FILE}"',
        'echo "building TensorRT $tensorrt plans for $gpu (compute capability $cc) in $repo"',
    ]
    for spec in engine_specs(meta, encoder_source, decoder_source):
        version_dir = f'"$repo/{spec.model}/1"'
        command = trtexec_command(spec, f"$repo/{spec.model}/1", "$plan", release, "$cache", trtexec="$trtexec")
        rendered = " ".join(_shell_word(part) for part in command)
        lines += [
            f'echo "{spec.model}: $plan from {spec.source}"',
            # The record first, then its plan: a failed build leaves neither (nor a partial plan).
            f"sed -i '/\"{model_spec.ENGINE_PARAMETER_PREFIX}'\"${{cc//./}}\"'\"/d' {_config_path(spec.model)}",
            f'rm -f {version_dir}/"$plan"',
            f'{rendered} || {{ rm -f {version_dir}/"$plan"; exit 1; }}',
            "printf 'parameters { key: \"%s\" value: { string_value: \"" + _RECORD_FORMAT + "\" } }\\n' "
            f'"{model_spec.ENGINE_PARAMETER_PREFIX}${{cc//./}}" "$cc" "$gpu" "$plan" "$tensorrt" '
            f">> {_config_path(spec.model)}",
        ]
    lines.append('echo "done: restart (or reload) Triton to load the plans"')
    return "\n".join(lines) + "\n"


def write_script(repository: Path, meta: model_spec.ModelMetadata, encoder_source: str, decoder_source: str,
                 tensorrt_major: int) -> Path:
    path = Path(repository) / SCRIPT_FILE
    path.write_text(build_script(meta, encoder_source, decoder_source, tensorrt_major))
    path.chmod(0o755)
    return path


def build_engines(repository: Path, trtexec: str = "trtexec", extra_env: Mapping[str, str] | None = None,
                  run: Sequence[str] = ("bash",)) -> None:
    """Run a rendered repository's ``build_engines.sh`` here (``trtexec`` and the serving GPU must be present)."""
    script = Path(repository) / SCRIPT_FILE
    if not script.exists():
        raise FileNotFoundError(f"{script} is missing: render the repository with --target gpu-tensorrt first")
    if shutil.which(trtexec) is None and not Path(trtexec).exists():
        raise FileNotFoundError(
            f"{trtexec} not found: TensorRT engines are built on the serving GPU with NVIDIA's TensorRT container "
            "(the chart's tensorrtEngines Job runs this script there); see README 'GPU'")
    env = {**os.environ, "TRTEXEC": trtexec, **(extra_env or {})}
    LOG.info("building TensorRT engines with %s", script)
    subprocess.run([*run, str(script), str(repository)], check=True, env=env)
