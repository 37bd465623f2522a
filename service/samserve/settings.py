"""The one settings object. Every knob is an environment variable ``SAMSERVE_<NAME>`` (documented in README)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENES_CHECKPOINT = REPO_ROOT / "build" / "checkpoints" / "samserve_scenes_v1.pth"
"""The small SAM trained on generated scenes (model card beside it): served when no other model is configured."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMSERVE_", extra="ignore")

    # Where generated artifacts live (exported models, rendered Triton repository, backend folder, logs).
    workdir: Path = Field(REPO_ROOT / ".samserve", description="folder for generated artifacts")

    # The model `make up` serves.
    model_variant: str = Field("scenes", description="scenes (the shipped model) | vit_h | vit_l | vit_b | tiny | custom")
    checkpoint: Path | None = Field(
        None, description="Meta-format checkpoint; unset = the shipped checkpoint for `scenes`, else seeded random weights"
    )
    random_seed: int = Field(0, description="seed of the random weights used when no checkpoint is set")

    # Triton Inference Server.
    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_start_timeout_s: float = Field(300.0, description="how long to wait for Triton's models to be ready")
    triton_log_verbose: int = 0

    # Gateway (gRPC API samserve.v1.SegmentAnything).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(50051, description="gateway gRPC port (0 = pick a free one)")
    metrics_port: int = Field(9464, description="gateway Prometheus /metrics port")
    embedding_transport: str = Field("shm", description="shm (Triton on this host) | grpc (embedding inline)")
    triton_timeout_s: float = Field(600.0, description="upper bound of one Triton call (client deadlines cut it)")
    max_request_bytes: int = Field(32 << 20, description="largest request message; larger -> RESOURCE_EXHAUSTED")
    max_image_pixels: int = Field(64_000_000, description="largest image (width*height); larger -> INVALID_ARGUMENT")
    max_prompts: int = Field(256, description="prompts per Segment request")
    max_points_per_prompt: int = Field(64, description="points per prompt")
    max_concurrent_encodes: int = Field(2, description="encoder calls in flight per gateway")
    max_queued_encodes: int = Field(32, description="encodes waiting beyond that; more -> RESOURCE_EXHAUSTED")
    max_generate_points: int = Field(
        16384, description="GenerateMasks: grid points per crop layer (points_per_side <= 128); more -> INVALID_ARGUMENT"
    )
    max_generate_points_per_batch: int = Field(256, description="GenerateMasks: largest points_per_batch")
    generate_decoder_calls_in_flight: int = Field(
        3, description="GenerateMasks: decoder calls of one request in flight (overlaps decoding and post-processing)"
    )
    shutdown_grace_s: float = Field(10.0, description="SIGTERM: seconds in-flight calls get to finish")
    health_check_interval_s: float = Field(1.0, description="how often the gateway checks Triton's models")

    # Embedding cache.
    l1_cache_bytes: int = Field(
        512 << 20, description="tier 1 capacity: fp32 embeddings, counted twice with the shm transport"
    )
    redis_url: str | None = Field(None, description="tier 2, e.g. redis://127.0.0.1:6379/0; unset = tier 1 only")
    redis_cluster: bool = Field(False, description="redis_url points at a Redis Cluster node")
    redis_ttl_s: int = Field(24 * 3600, description="how long tier 2 keeps an embedding")
    redis_timeout_s: float = Field(1.0, description="per Redis operation; slower counts as a failure")
    redis_lock_ttl_s: float = Field(120.0, description="single-flight lock lifetime (a crashed holder's lock expires)")
    redis_server_port: int = Field(6379, description="port of the redis-server that `samserve up` starts")
    failure_log_interval_s: float = Field(30.0, description="Redis failures are logged at most once per interval")

    @model_validator(mode="after")
    def _shipped_checkpoint(self) -> "Settings":
        if self.checkpoint is None and self.model_variant == "scenes":
            self.checkpoint = SCENES_CHECKPOINT
        return self

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"

    @property
    def model_id(self) -> str:
        if self.checkpoint is not None:
            return f"{self.model_variant}:{self.checkpoint.stem}"
        return f"{self.model_variant}-random-seed{self.random_seed}"
