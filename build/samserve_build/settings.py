"""What the build side reads on top of the stack's settings: the model to export and the serving target."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from samserve.core.settings import StackSettings
from samserve_build.targets import ServingTargetName

SCENES_CHECKPOINT = Path(str(importlib.resources.files("samserve_build.checkpoints") / "samserve_scenes_v1.pth"))
"""The small SAM trained on generated scenes (model card beside it): served when no other model is configured."""


class BuildSettings(StackSettings):
    model_variant: str = Field(
        "scenes", description="scenes (the shipped model trained here), vit_h, vit_l, vit_b (Meta's), tiny (tests) or "
        "custom (architecture JSON beside the checkpoint); others stop the command with the allowed values"
    )
    checkpoint: Path | None = Field(
        None,
        description="checkpoint in Meta's format; unset = the shipped checkpoint for `scenes`, seeded random weights "
                    "otherwise",
    )
    random_seed: int = Field(0, description="seed of the random weights used when no checkpoint is set")
    target: ServingTargetName = Field(
        ServingTargetName.AUTO,
        validation_alias=AliasChoices("SAMSERVE_TARGET", "SAMSERVE_SERVING_TARGET"),  # never a bare TARGET
        description="how Triton runs the models: auto (the fastest CPU target on this machine, calibrated once and "
                    "cached in the workdir; docs/cpu-runtimes.md), cpu-onnxruntime (fp32, exact parity with the "
                    "official code), cpu-openvino, cpu-openvino-bf16 (CPUs with AVX-512-bf16 or AMX), gpu-torch or "
                    "gpu-tensorrt (docs/gpu.md); samserve_build.targets, templates in `model_repository/<target>/`; "
                    "SAMSERVE_SERVING_TARGET, the older name, still works",
    )

    device: Literal["gpu", "cpu"] | None = Field(
        None, description="where Triton runs the models: unset = the target's own (GPU targets: gpu); cpu runs "
                          "gpu-torch's PyTorch modules on the CPU (trying it on a machine without a GPU)")
    tensorrt_major: int = Field(
        10, description="gpu-tensorrt: the TensorRT major that builds the plans (10 for Triton 24.12, or 11): the "
        "trtexec flags differ"
    )

    @field_validator("model_variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        from samserve_build.architectures import ARCHITECTURES

        if value != "custom" and value not in ARCHITECTURES:
            raise ValueError(f"unknown model variant {value!r}; one of {sorted(ARCHITECTURES)} or custom")
        return value

    @model_validator(mode="after")
    def _shipped_checkpoint(self) -> BuildSettings:
        if self.checkpoint is None and self.model_variant == "scenes":
            self.checkpoint = SCENES_CHECKPOINT
        return self

    @property
    def model_id(self) -> str:
        if self.checkpoint is not None:
            return f"{self.model_variant}:{self.checkpoint.stem}"
        return f"{self.model_variant}-random-seed{self.random_seed}"
