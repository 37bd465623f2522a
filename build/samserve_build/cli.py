"""``samserve-build``: export SAM to ONNX, write seeded random checkpoints, render the Triton repository.

    samserve-build export --variant vit_b --checkpoint sam_vit_b_01ec64.pth --out models/vit_b
    samserve-build export --variant tiny --random-weights --seed 0 --out models/tiny
    samserve-build repository --model models/vit_b --out repository
    samserve-build repository --model models/vit_h --out repository --target gpu-torch --checkpoint sam_vit_h_4b8939.pth
    samserve-build repository --model models/vit_h --out repository --target gpu-tensorrt
    samserve-build tensorrt --repository repository   # on the serving GPU, where trtexec is installed
    samserve-build prepare          # what `make up` runs: the configured model, exported once, + repository
    samserve-build train --out runs/scenes          # train the small scenes model (resumable)
    samserve-build evaluate --checkpoint runs/scenes/model.pth --scenes 500 --out quality.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from pathlib import Path

from samserve.core import model_spec
from samserve_build import architectures, export, repository, workdir
from samserve_build.settings import BuildSettings
from samserve_build.targets import SERVING_TARGETS, ServingTarget, ServingTargetName

LOG = logging.getLogger("samserve_build")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def export_from_args(variant: str, checkpoint: Path | None, random_seed: int | None, out: Path, model_id: str | None,
                     external_data: bool = False) -> export.ExportResult:
    """Export a checkpoint, or seeded random weights written as a checkpoint beside the exported model."""
    if checkpoint is not None:
        result = export.export_model(variant, checkpoint, out, model_id=model_id, force_external_data=external_data)
    elif random_seed is not None:
        result = export.export_random_weights(variant, random_seed, out, model_id)
    else:
        raise SystemExit("give --checkpoint PATH or --random-weights --seed N")
    LOG.info(
        "exported %s to %s in %.1f s (max relative error vs PyTorch: encoder %.2g, decoder %.2g)",
        result.metadata.model_id, result.directory, result.seconds, result.encoder_error, result.decoder_error,
    )
    return result


PREPARE_LOCK = ".prepare.lock"
"""In the workdir: held by each ``prepare`` for all of its work, so preparers sharing the folder (init containers
of several pods on one volume) run one after another and every later one finds the work done."""


def prepare(settings: BuildSettings) -> Path:
    """Export the configured model unless an export of the same weights exists; render the repository (a render
    equal to the one served keeps it). One at a time per workdir (:data:`PREPARE_LOCK`); the repository's path."""
    with workdir.exclusive_lock(settings.workdir / PREPARE_LOCK, "prepare"):
        return _prepare(settings)


def _prepare(settings: BuildSettings) -> Path:
    model_dir = settings.workdir / "models" / _slug(settings.model_id)
    checkpoint = settings.checkpoint
    if checkpoint is None:
        LOG.warning(
            "SAMSERVE_CHECKPOINT is not set: serving %s with seeded RANDOM weights (masks are noise). "
            "Set SAMSERVE_CHECKPOINT=/path/to/sam_vit_b_01ec64.pth and SAMSERVE_MODEL_VARIANT=vit_b for real masks, "
            "or leave SAMSERVE_MODEL_VARIANT unset for the shipped model trained on generated scenes.",
            settings.model_variant,
        )
    current = None
    if (model_dir / model_spec.METADATA_FILE).exists():
        current = model_spec.ModelMetadata.read(model_dir)
    wanted_digest = architectures.sha256_file(checkpoint) if checkpoint is not None else None
    up_to_date = current is not None and (
        wanted_digest == current.weights_sha256 if wanted_digest else current.model_id == settings.model_id
    ) and current.preprocessing_version == model_spec.PREPROCESSING_VERSION and export.written_by_this_exporter(current)
    if up_to_date:
        LOG.info("model %s already exported in %s", settings.model_id, model_dir)
    else:
        export_from_args(settings.model_variant, checkpoint, settings.random_seed, model_dir, settings.model_id)
    if checkpoint is None:  # where export_random_weights wrote the random weights
        checkpoint = model_dir.with_name(model_dir.name + "-checkpoint") / (
            f"{settings.model_variant}-seed{settings.random_seed}.pth")
    target = concrete_target(settings.target, model_dir, settings.workdir)
    runs_checkpoint = target.needs_checkpoint
    kind, parameters = device_options(target, settings.device)
    return repository.write_repository(model_dir, settings.repository, target,
                                       checkpoint=checkpoint if runs_checkpoint else None, instance_kind=kind,
                                       parameters=parameters, tensorrt_major=settings.tensorrt_major)


def concrete_target(target: ServingTargetName, model_dir: Path, workdir: Path) -> ServingTarget:
    """The registered ``target``, or for ``auto`` the CPU encoder and decoder chosen for this machine (calibrated
    once per machine and model, cached in ``workdir``)."""
    if target is ServingTargetName.AUTO:
        from samserve_build import cpu_choice

        return cpu_choice.resolve(model_dir, workdir)
    return SERVING_TARGETS[target]


DEVICES: dict[str, tuple[str, dict[str, str]]] = {
    "gpu": ("KIND_GPU", {}),
    "cpu": ("KIND_CPU", {"device": "cpu"}),
}
"""``repository --device``: instance kind and config parameters (``device`` where a template has it)."""


def device_options(target: ServingTarget | ServingTargetName | str, device: str | None
                   ) -> tuple[str | None, dict[str, str]]:
    """(instance kind, config parameters) that run ``target`` on ``device`` (None: as its templates say)."""
    if device is None:
        return None, {}
    kind, parameters = DEVICES[device]
    present = repository.template_parameters(target)
    return kind, {key: value for key, value in parameters.items() if key in present}


def _parameter(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def tensorrt_releases() -> list[int]:
    from samserve_build import tensorrt

    return list(tensorrt.TENSORRT_RELEASES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samserve-build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p_export = commands.add_parser("export", help="export encoder + decoder ONNX with metadata, checked vs PyTorch")
    p_export.add_argument("--variant", required=True, choices=[*architectures.ARCHITECTURES, "custom"])
    weights = p_export.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="checkpoint in Meta's format (state dict)")
    weights.add_argument("--random-weights", action="store_true", help="seeded random weights (tests)")
    p_export.add_argument("--seed", type=int, default=0)
    p_export.add_argument("--out", type=Path, required=True)
    p_export.add_argument("--model-id", help="identifier served to clients (default: the variant)")
    p_export.add_argument("--external-data", action="store_true",
                          help="store encoder weights in encoder.onnx.data (automatic above 1 GiB)")

    p_random = commands.add_parser("random-checkpoint", help="write seeded random weights in Meta's format")
    p_random.add_argument("--variant", required=True, choices=list(architectures.ARCHITECTURES))
    p_random.add_argument("--seed", type=int, default=0)
    p_random.add_argument("--out", type=Path, required=True)

    p_repo = commands.add_parser("repository", help="render a Triton model repository for an exported model")
    p_repo.add_argument("--model", type=Path, required=True, help="folder written by `export`")
    p_repo.add_argument("--out", type=Path, required=True)
    p_repo.add_argument("--target", type=ServingTargetName, default=ServingTargetName.CPU_ONNXRUNTIME,
                        choices=[*SERVING_TARGETS, ServingTargetName.AUTO],
                        help="serving target (default cpu-onnxruntime); auto: the fastest CPU target here")
    p_repo.add_argument("--workdir", type=Path, default=Path(".samserve"),
                        help="where --target auto caches its calibration (default .samserve)")
    p_repo.add_argument("--checkpoint", type=Path, help="the exported checkpoint (targets that run it: gpu-torch)")
    p_repo.add_argument("--device", choices=list(DEVICES),
                        help="instance kind of every model (default: the template's); cpu also sets device=cpu "
                             "where a config has it (gpu-torch on a machine without a GPU)")
    p_repo.add_argument("--parameter", type=_parameter, action="append", default=[], metavar="KEY=VALUE",
                        help="set a config parameter the templates have (repeatable), e.g. precision=fp32")
    p_repo.add_argument("--tensorrt-major", type=int, default=repository.DEFAULT_TENSORRT_MAJOR,
                        choices=sorted(tensorrt_releases()), help="TensorRT that builds the plans (gpu-tensorrt)")

    p_trt = commands.add_parser("tensorrt", help="build a gpu-tensorrt repository's plans here (needs trtexec + GPU)")
    p_trt.add_argument("--repository", type=Path, required=True, help="rendered with --target gpu-tensorrt")
    p_trt.add_argument("--trtexec", default="trtexec", help="path of trtexec (default: from PATH)")

    p_train = commands.add_parser("train", help="train (or resume) the small SAM on generated scenes")
    p_train.add_argument("--out", type=Path, required=True, help="run folder: state.pt, train_log.jsonl, model.pth")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--steps", type=int, default=None, help="at most this many steps (default: the config's)")
    p_train.add_argument("--budget-minutes", type=float, default=None, help="at most this much training time")
    p_train.add_argument("--init-from", type=Path, default=None, help="start from another run's state.pt (a stage)")
    p_train.add_argument("--previous-minutes", type=float, default=0.0, help="training time of that earlier stage")
    p_train.add_argument("--learning-rate", type=float, default=None)
    p_train.add_argument("--warmup-steps", type=int, default=None)
    p_train.add_argument("--max-minutes", type=float, default=None,
                         help="stop this session after this long (resume later with the same command)")

    p_eval = commands.add_parser("evaluate", help="mask quality on held-out scenes with the official predictor")
    p_eval.add_argument("--checkpoint", type=Path, required=True, help="model.pth with model.json beside it")
    p_eval.add_argument("--scenes", type=int, default=500)
    p_eval.add_argument("--out", type=Path, help="write the quality table as JSON here")

    commands.add_parser("prepare",
                        help="export the configured model (SAMSERVE_* settings) once and render the repository")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=Warning, module=r"torch\..*|segment_anything\..*")
    if args.command == "export":
        export_from_args(args.variant, args.checkpoint, args.seed if args.random_weights else None, args.out,
                         args.model_id, args.external_data)
    elif args.command == "random-checkpoint":
        print(architectures.write_random_checkpoint(args.variant, args.seed, args.out))
    elif args.command == "repository":
        target = concrete_target(args.target, args.model, args.workdir)
        kind, device_parameters = device_options(target, args.device)
        print(repository.write_repository(
            args.model, args.out, target, checkpoint=args.checkpoint, instance_kind=kind,
            parameters={**device_parameters, **dict(args.parameter)}, tensorrt_major=args.tensorrt_major))
    elif args.command == "tensorrt":
        from samserve_build import tensorrt
        tensorrt.build_engines(args.repository, trtexec=args.trtexec)
    elif args.command == "train":
        from samserve_build import training
        overrides = {"seed": args.seed}
        if args.steps is not None:
            overrides["steps"] = args.steps
        if args.budget_minutes is not None:
            overrides["budget_minutes"] = args.budget_minutes
        if args.learning_rate is not None:
            overrides["learning_rate"] = args.learning_rate
        if args.warmup_steps is not None:
            overrides["warmup_steps"] = args.warmup_steps
        if args.init_from is not None:
            overrides.update(init_from=str(args.init_from), previous_minutes=args.previous_minutes)
        print(training.train(args.out, training.TrainConfig(**overrides), max_minutes=args.max_minutes))
    elif args.command == "evaluate":
        from samserve_build import evaluation
        print(json.dumps(evaluation.write_quality_table(args.checkpoint, args.scenes, args.out)["summary"], indent=2))
    elif args.command == "prepare":
        print(prepare(BuildSettings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
