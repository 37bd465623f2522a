"""Render a deployable Triton model repository from a serving target's templates and an exported model folder.

The committed ``model_repository/<target>/`` holds each model's config (and python-backend entry point); it ships
as package data (``samserve_build.model_repository``). This module copies a target's templates, applies
parameter overrides and the instance kind asked for, appends the model's metadata to each config as the
``samserve_metadata`` parameter (so the gateway reads sizes from Triton's model-config API, wherever Triton runs;
its ``precision`` is the encoder config's) and places the target's model file in version 1: an exported graph, a
graph derived from one (written into the export folder once), or the checkpoint (checked against the metadata).

The repository is served through a symlink, ``<out>`` -> ``<out>.<version>``
(:func:`samserve_build.workdir.publish_version`): each render is written complete into a staging folder of its own
and the link switched in one rename, so a Triton reading ``<out>`` always finds a whole repository and the files
of the version it loaded stay in place. A render equal to the version served (:data:`RENDER_MANIFEST`) changes
nothing: several pods' init containers preparing one volume leave the repository of the first in place.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from samserve.core import model_spec
from samserve_build import architectures, workdir
from samserve_build.targets import DERIVED_FILES, ServingTarget, ServingTargetName, serving_target

TEMPLATES: Traversable = importlib.resources.files("samserve_build.model_repository")
"""``model_repository/``: one folder of model templates per serving target."""

LOG = logging.getLogger(__name__)

RENDER_MANIFEST = ".samserve-render.json"
"""In each version's root (Triton reads only the model folders there): the SHA-256 of every file as rendered, by
relative path. A later render equal to it is not published again; files added to the version afterwards (the
TensorRT plans) stay."""

DEFAULT_TENSORRT_MAJOR = 10
"""TensorRT of Triton's release pinned by the chart and triton.Dockerfile (24.12: TensorRT 10.7)."""


class RepositoryError(ValueError):
    """The repository cannot be rendered as asked (a parameter the template lacks, a missing checkpoint, ...)."""


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """A config.pbtxt as Triton's ModelConfig message (unknown fields and typos raise ParseError)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def template_parameters(target: ServingTarget | ServingTargetName | str, templates: Traversable = TEMPLATES
                        ) -> set[str]:
    """The config parameters that ``target``'s templates have (either model)."""
    serving = serving_target(target)
    return {key for model in serving.model_files
            for key in parse_config((templates / serving.template(model) / model).joinpath("config.pbtxt").read_text())
            .parameters}


def _override(config: str, parameters: Mapping[str, str], instance_kind: str | None, model: str) -> str:
    """``config`` with the given parameters' values replaced (each must exist in the template) and every
    instance group of ``instance_kind`` (KIND_CPU | KIND_GPU)."""
    for key, value in parameters.items():
        pattern = re.compile(r'(key:\s*"' + re.escape(key) + r'"[^\n]*\n\s*value:\s*\{\s*string_value:\s*)"[^"]*"')
        replacement = _pbtxt_string(value).replace("\\", "\\\\")  # a literal in re.subn's template
        config, count = pattern.subn(r"\g<1>" + replacement, config)
        if count != 1:
            raise RepositoryError(f"{model}'s template has no parameter {key!r} to set")
    if instance_kind is not None:
        config = re.sub(r"kind:\s*KIND_[A-Z]+", f"kind: {instance_kind}", config)
    return config


def _source(name: str, model_dir: Path, meta: model_spec.ModelMetadata, checkpoint: Path | None) -> Path:
    """The file placed in version 1 as ``name``, written first if it is derived."""
    if name == model_spec.CHECKPOINT_FILE:
        if checkpoint is None:
            raise RepositoryError("this target runs the checkpoint itself: give its path (--checkpoint)")
        if architectures.sha256_file(checkpoint) != meta.weights_sha256:
            raise RepositoryError(f"{checkpoint} is not the checkpoint {model_dir} was exported from")
        return Path(checkpoint)
    path = model_dir / name
    if not path.exists() and name in DERIVED_FILES:
        staging = workdir.unique_dir(model_dir, f".{name}.staging-")  # a failed write leaves nothing finished-looking
        try:
            DERIVED_FILES[name](model_dir, staging / name, meta)
            for written in sorted(staging.iterdir()):  # the graph and its external data, names kept
                written.rename(model_dir / written.name)
        finally:
            workdir.remove(staging)
    if not path.exists():
        raise RepositoryError(f"{model_dir} has no {name}: export the model first")
    return path


def write_repository(
    model_dir: Path, out: Path, target: ServingTarget | ServingTargetName | str = ServingTargetName.CPU_ONNXRUNTIME,
    templates: Traversable = TEMPLATES, *, checkpoint: Path | None = None,
    parameters: Mapping[str, str] | None = None, instance_kind: str | None = None,
    tensorrt_major: int = DEFAULT_TENSORRT_MAJOR,
) -> Path:
    """Write a Triton repository serving the exported model in ``model_dir`` on ``target`` and serve it as ``out``
    (a symlink to the version written, switched atomically; a render equal to the version served keeps that one).
    Returns ``out``. ``checkpoint``: the weights, for targets that run them (gpu-torch). ``parameters``: config
    parameters to set in both models (those a template has), e.g. ``{"device": "cpu", "precision": "fp32"}``.
    ``instance_kind``: KIND_CPU or KIND_GPU for every instance group. ``tensorrt_major``: the TensorRT that
    builds the plans (gpu-tensorrt)."""
    model_dir, out = Path(model_dir), Path(out)
    try:
        serving = serving_target(target)
    except ValueError as error:
        raise RepositoryError(str(error)) from None
    exported = model_spec.ModelMetadata.read(model_dir)
    configs = {}
    for model_name in serving.model_files:
        text = (templates / serving.template(model_name) / model_name).joinpath("config.pbtxt").read_text()
        present = {key: value for key, value in (parameters or {}).items() if key in parse_config(text).parameters}
        configs[model_name] = _override(text, {**serving.parameters.get(model_name, {}), **present}, instance_kind,
                                        model_name)
    missing = set(parameters or {}) - {key for text in configs.values() for key in parse_config(text).parameters}
    if missing:
        raise RepositoryError(f"no config of target {serving.label} has the parameters {sorted(missing)}")
    encoder_parameters = parse_config(configs[model_spec.ENCODER_MODEL]).parameters
    precision = (encoder_parameters[model_spec.PRECISION_PARAMETER].string_value
                 if model_spec.PRECISION_PARAMETER in encoder_parameters else exported.precision)
    metadata = dataclasses.replace(exported, precision=precision)
    if metadata.unservable_reason():
        raise RepositoryError(metadata.unservable_reason())
    staging = workdir.unique_dir(out.parent, f".{out.name}.staging-")
    try:
        _render(staging, serving, configs, metadata, exported, model_dir, templates, checkpoint, tensorrt_major)
        manifest = render_manifest(staging)
        (staging / RENDER_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        workdir.publish_version(staging, out, is_current=lambda served: _recorded_manifest(served) == manifest)
    finally:
        workdir.remove(staging)  # gone already once published
    return out


def render_manifest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (symlinks followed) by POSIX relative path, :data:`RENDER_MANIFEST`
    itself left out."""
    files = (path for path in sorted(root.rglob("*")) if path.is_file())
    return {name: architectures.sha256_file(path)
            for path in files if (name := path.relative_to(root).as_posix()) != RENDER_MANIFEST}


def _recorded_manifest(version: Path) -> dict[str, str] | None:
    """The manifest a version was published with (None: none, e.g. a repository written before manifests)."""
    try:
        recorded: dict[str, str] = json.loads((version / RENDER_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return recorded


def _render(staging: Path, serving: ServingTarget, configs: Mapping[str, str], metadata: model_spec.ModelMetadata,
            exported: model_spec.ModelMetadata, model_dir: Path, templates: Traversable, checkpoint: Path | None,
            tensorrt_major: int) -> None:
    """Write the repository into the empty folder ``staging``: per model its config (``configs``, with the
    metadata appended), the template's version files and the target's model files in version 1."""
    for model_name, model_file in serving.model_files.items():
        template = templates / serving.template(model_name) / model_name
        version = staging / model_name / "1"
        version.mkdir(parents=True)
        config = configs[model_name]
        if serving.exact_dims:
            from samserve_build import tensorrt

            config = (f"# Rendered by samserve-build repository from model_repository/{serving.template(model_name)}/"
                      f"{model_name}/config.pbtxt (comments there) with the exported model's dims.\n"
                      + tensorrt.with_exact_dims(config, tensorrt.triton_dims(metadata)[model_name]))
        config += (
            "\n# Appended by samserve-build repository: the exported model's metadata.\n"
            f'parameters {{\n  key: "{model_spec.METADATA_PARAMETER}"\n'
            f"  value: {{ string_value: {_pbtxt_string(metadata.to_json())} }}\n}}\n"
        )
        (staging / model_name / "config.pbtxt").write_text(config)
        for entry in template.joinpath("1").iterdir() if template.joinpath("1").is_dir() else ():
            if entry.is_file():  # the python backend's entry point
                (version / entry.name).write_bytes(entry.read_bytes())
        for placed_file in (model_file, *serving.extra_files.get(model_name, ())):
            source = _source(placed_file, model_dir, exported, checkpoint)
            for placed in sorted(source.parent.glob(source.name + "*")) if source.parent == model_dir else [source]:
                _link_or_copy(placed, version / placed.name.replace(source.name, placed_file))  # with external data
        metadata.write(version)  # beside the graph: what it is (the gateway gives the decoder to browsers with it)
    if serving.finish is not None:
        serving.finish(staging, metadata, tensorrt_major)
