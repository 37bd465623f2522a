"""Render a deployable Triton model repository from a serving target's templates and an exported model folder.

The committed ``model_repository/<target>/`` holds each model's config (and python-backend entry point); it ships
as package data (``samserve_build.model_repository``). This module copies a target's templates, appends the
model's metadata to each config as the ``samserve_metadata`` parameter (so the gateway reads sizes from Triton's
model-config API, wherever Triton runs) and places the target's model files in version 1.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
from importlib.resources.abc import Traversable
from pathlib import Path

from samserve import model_spec
from samserve_build.targets import SERVING_TARGETS, ServingTargetName

TEMPLATES: Traversable = importlib.resources.files("samserve_build.model_repository")
"""``model_repository/``: one folder of model templates per serving target."""


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_repository(
    model_dir: Path, out: Path, target: ServingTargetName | str = ServingTargetName.CPU_ONNXRUNTIME,
    templates: Traversable = TEMPLATES,
) -> Path:
    """Write a Triton repository serving the exported model in ``model_dir`` on ``target`` to ``out`` (replaced
    atomically)."""
    model_dir, out = Path(model_dir), Path(out)
    serving = SERVING_TARGETS[ServingTargetName(target)]
    metadata = model_spec.ModelMetadata.read(model_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for model_name, model_file in serving.model_files.items():
        template = templates / serving.templates / model_name
        version = staging / model_name / "1"
        version.mkdir(parents=True)
        config = template.joinpath("config.pbtxt").read_text()
        config += (
            "\n# Appended by samserve-build repository: the exported model's metadata.\n"
            f'parameters {{\n  key: "{model_spec.METADATA_PARAMETER}"\n'
            f"  value: {{ string_value: {_pbtxt_string(metadata.to_json())} }}\n}}\n"
        )
        (staging / model_name / "config.pbtxt").write_text(config)
        for entry in template.joinpath("1").iterdir() if template.joinpath("1").is_dir() else ():
            if entry.is_file():  # the python backend's entry point
                (version / entry.name).write_bytes(entry.read_bytes())
        for exported in sorted(model_dir.glob(model_file + "*")):  # the file and its external data, if any
            _link_or_copy(exported, version / exported.name)
        metadata.write(version)  # beside the graph: what it is (the gateway gives the decoder to browsers with it)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
