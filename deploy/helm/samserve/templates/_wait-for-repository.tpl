{{/* wait-for-repository, Triton's init container where the repository comes from elsewhere (the prepare Job, the
engine Job): run by the prepare image's Python, it returns once both models' configs exist and, with
--tensorrt-version, each records a plan (samserve.core.model_spec.EngineRecord) of that TensorRT version (and of
--compute-capability when given) whose file is there. --once checks once (exit 1: not ready); tests/deploy runs the
rendered script so against folders of configs. */}}
{{- define "samserve.waitForRepositoryScript" -}}
import argparse
import pathlib
import sys
import time

from google.protobuf import text_format
from samserve.core import model_spec
from tritonclient.grpc import model_config_pb2


def same_release(recorded: str, expected: str) -> bool:
    """10.7.0 is of 10.7 and of 10.7.0; 10.70.1 is of neither."""
    wanted = expected.split(".")
    return recorded.split(".")[:len(wanted)] == wanted


def has_plan(model_dir: pathlib.Path, plan: str) -> bool:
    return any((version / plan).is_file() for version in model_dir.iterdir() if version.name.isdigit())


def not_ready(repository: pathlib.Path, tensorrt: str, capability: str) -> list[str]:
    """Why Triton cannot start on the repository yet ([] = it can)."""
    reasons = []
    for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
        path = repository / model / "config.pbtxt"
        if not path.is_file():
            reasons.append(f"{path} is missing")
            continue
        if not tensorrt:
            continue
        try:
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            records = [model_spec.EngineRecord.from_json(parameter.string_value)
                       for key, parameter in config.parameters.items()
                       if key.startswith(model_spec.ENGINE_PARAMETER_PREFIX)]
        except (text_format.ParseError, ValueError, KeyError, TypeError) as error:  # being written
            reasons.append(f"{path}: {error}")
            continue
        usable = [r for r in records if same_release(r.tensorrt_version, tensorrt) and has_plan(path.parent, r.plan)]
        if capability:
            ready = any(r.compute_capability == capability for r in usable)
        else:  # any GPU kind may serve: every recorded plan must be current
            ready = bool(records) and len(usable) == len(records)
        if not ready:
            recorded = ", ".join(f"{r.plan} (TensorRT {r.tensorrt_version}, cc {r.compute_capability})"
                                 for r in records) or "none"
            wanted = f"TensorRT {tensorrt}" + (f", compute capability {capability}" if capability else "")
            reasons.append(f"{model}: needs plans of {wanted} recorded with their files; recorded: {recorded}")
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(prog="wait-for-repository")
    parser.add_argument("--repository", type=pathlib.Path, required=True)
    parser.add_argument("--tensorrt-version", default="", help="require plans of this TensorRT version")
    parser.add_argument("--compute-capability", default="", help="require a plan for this GPU architecture")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--once", action="store_true", help="check once: exit 0 when ready, 1 when not")
    args = parser.parse_args()
    told = None
    while True:
        reasons = not_ready(args.repository, args.tensorrt_version, args.compute_capability)
        if not reasons:
            print(f"{args.repository} is ready", flush=True)
            return 0
        if reasons != told:
            print("waiting: " + "; ".join(reasons), flush=True)
            told = reasons
        if args.once:
            return 1
        time.sleep(args.poll_seconds)


sys.exit(main())
{{- end -}}
