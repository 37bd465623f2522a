"""The one settings object. Every knob is an environment variable ``SAMSERVE_<NAME>`` (documented in README)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMSERVE_", extra="ignore")

    # Where generated artifacts live (exported models, rendered Triton repository, backend folder, logs).
    workdir: Path = Field(REPO_ROOT / ".samserve", description="folder for generated artifacts")

    # The model `make up` serves.
    model_variant: str = Field("vit_b", description="vit_h | vit_l | vit_b | tiny | custom")
    checkpoint: Path | None = Field(None, description="Meta-format checkpoint; unset = seeded random weights")
    random_seed: int = Field(0, description="seed of the random weights used when no checkpoint is set")

    # Triton Inference Server.
    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_start_timeout_s: float = Field(300.0, description="how long to wait for Triton's models to be ready")
    triton_log_verbose: int = 0

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"

    @property
    def model_id(self) -> str:
        if self.checkpoint is not None:
            return f"{self.model_variant}:{self.checkpoint.stem}"
        return f"{self.model_variant}-random-seed{self.random_seed}"
