"""Exported models (seeded random weights or the shipped checkpoint) and a real Triton serving one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from samserve.core import model_spec
from samserve.launch import triton_server
from samserve_build import export
from samserve_dev.local_stack import serve_locally

TRITON_START_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    variant: str
    checkpoint: Path
    directory: Path
    metadata: model_spec.ModelMetadata


@dataclasses.dataclass(frozen=True)
class ServedModel:
    model: ExportedModel
    server: triton_server.TritonServer

    @property
    def url(self) -> str:
        return self.server.grpc_url


def export_random(variant: str, seed: int, root: Path) -> ExportedModel:
    result = export.export_random_weights(variant, seed, root / "model")
    return ExportedModel(variant, result.checkpoint, result.directory, result.metadata)


def serve(model: ExportedModel, root: Path) -> Iterator[ServedModel]:
    with serve_locally(model.directory, root, TRITON_START_TIMEOUT_S) as server:
        yield ServedModel(model, server)
