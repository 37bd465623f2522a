"""Render a deployable Triton model repository from ``model_repository/`` and an exported model folder.

The committed ``model_repository/`` holds each model's config and python-backend entry point. This module copies
them, appends the model's metadata to each config as the ``samserve_metadata`` parameter (so the gateway reads
sizes from Triton's model-config API, wherever Triton runs) and places the exported graphs in version 1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from samserve import model_spec

SOURCE_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MODEL_FILES = {
    model_spec.ENCODER_MODEL: model_spec.ENCODER_FILE,
    model_spec.DECODER_MODEL: model_spec.DECODER_FILE,
}


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_repository(model_dir: Path, out: Path, source: Path = SOURCE_REPOSITORY) -> Path:
    """Write a Triton repository for the exported model in ``model_dir`` to ``out`` (replaced atomically)."""
    model_dir, out = Path(model_dir), Path(out)
    metadata = model_spec.ModelMetadata.read(model_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for model_name, graph_file in MODEL_FILES.items():
        template = source / model_name
        version = staging / model_name / "1"
        version.mkdir(parents=True)
        config = (template / "config.pbtxt").read_text()
        config += (
            "\n# Appended by samserve-build repository: the exported model's metadata.\n"
            f'parameters {{\n  key: "{model_spec.METADATA_PARAMETER}"\n'
            f"  value: {{ string_value: {_pbtxt_string(metadata.to_json())} }}\n}}\n"
        )
        (staging / model_name / "config.pbtxt").write_text(config)
        shutil.copy2(template / "1" / "model.py", version / "model.py")
        for graph in sorted(model_dir.glob(graph_file + "*")):  # the graph and its external data, if any
            _link_or_copy(graph, version / graph.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out

