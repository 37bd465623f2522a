"""Serving targets: how the two SAM models run inside Triton. A registry, as ``ARCHITECTURES`` is for variants.

A target names its model-config templates (``model_repository/<name>/``) and, per Triton model, the exported file
that goes into version 1 (the config's ``model_file`` parameter names the same file: a test checks they agree).
The gateway needs nothing of this: request layout, dtypes and sizes come from the served configs and metadata.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from samserve import model_spec


class ServingTargetName(enum.StrEnum):
    CPU_ONNXRUNTIME = "cpu-onnxruntime"


@dataclasses.dataclass(frozen=True)
class ServingTarget:
    name: ServingTargetName
    description: str
    model_files: Mapping[str, str]
    """Triton model name -> the exported file placed in version 1 (external data beside it comes along)."""

    @property
    def templates(self) -> str:
        """Folder of this target's templates inside ``model_repository/``."""
        return self.name.value


SERVING_TARGETS: dict[ServingTargetName, ServingTarget] = {
    ServingTargetName.CPU_ONNXRUNTIME: ServingTarget(
        name=ServingTargetName.CPU_ONNXRUNTIME,
        description="ONNX Runtime (CPU execution provider, fp32) inside Triton's python backend",
        model_files={model_spec.ENCODER_MODEL: model_spec.ENCODER_FILE,
                     model_spec.DECODER_MODEL: model_spec.DECODER_FILE},
    ),
}
