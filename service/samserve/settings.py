"""The settings objects. Every knob is an environment variable ``SAMSERVE_<NAME>`` (documented in README).

One hierarchy, split by who needs what: :class:`GatewaySettings` is all a gateway replica reads at run time
(``samserve gateway``, the container image); :class:`StackSettings` adds what ``samserve up`` needs to launch
Triton and Redis on this machine; the build side (``samserve_build.settings.BuildSettings``) adds the model to
export and the serving target. Choices are Enums, so a typo fails at start-up with the allowed values.
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TransportName(enum.StrEnum):
    """How embeddings and decoder outputs travel between gateway and Triton (see :mod:`samserve.transports`)."""

    GRPC = "grpc"
    SHM = "shm"
    CUDA = "cuda"


class AuthMode(enum.StrEnum):
    """Who may call the gateway's API (health checks are always open)."""

    API_KEYS = "api-keys"
    """Bearer credentials: API keys (api_keys_file) and/or JWTs (jwt_jwks_file)."""
    OFF = "off"


class CacheScope(enum.StrEnum):
    """Who shares cached embeddings (README "Security", cache scope)."""

    SHARED = "shared"
    TENANT = "tenant"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


MAX_CHANNEL_AGE_S = float((2**31 - 1) // 1000)
"""The longest connection or channel age a setting may give: gRPC takes ages as 32-bit milliseconds (~24.8 days)."""


class GatewaySettings(BaseSettings):
    """What a gateway replica needs: where Triton and Redis are, its own ports, limits and cache sizes."""

    model_config = SettingsConfigDict(env_prefix="SAMSERVE_", extra="ignore", use_enum_values=False,
                                      env_parse_none_str="none")

    log_level: LogLevel = Field(LogLevel.INFO, description="DEBUG | INFO | WARNING | ERROR")

    # Triton Inference Server, as a client sees it.
    triton_host: str = Field(
        "127.0.0.1", description="Triton's host as the gateway calls it; a `dns:///name` of several Triton pods (a "
        "headless Service) spreads the calls round robin (embedding_transport grpc: shared memory needs one host)",
    )
    triton_grpc_port: int = 8001
    triton_channel_max_age_s: float = Field(
        60.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="the gateway's channel to Triton is replaced by a new one this long after it was made (at the "
        "next call; calls in flight finish on the old one), so a triton_host that is a `dns:///` name of several "
        "Triton pods is resolved again and pods added since get calls; 0 = keep one channel",
    )

    # Gateway (gRPC API samserve.v1.SegmentAnything).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(50051, description="gateway gRPC port (0 = pick a free one)")
    metrics_port: int = Field(9464, description="gateway Prometheus /metrics port")
    health_port: int | None = Field(
        None, description="plaintext gRPC port serving only grpc.health.v1 (Kubernetes' gRPC probes when the API "
        "port has TLS); unset: none")
    http_port: int | None = Field(
        8080, description="HTTP/JSON API, web page and /openapi.json (same TLS, auth and limits as gRPC; 0 = pick a "
        "free one); `none`: no HTTP")
    http_cors_origins: list[str] = Field(
        [], description="origins (JSON list, e.g. [\"https://app.example\"]) whose web pages may call the HTTP API "
        "(CORS); empty: same origin only")
    client_decoder_dir: Path | None = Field(
        None, description="exported model folder (metadata.json + decoder.onnx) whose decoder clients may download "
        "for client-side decoding, while it is the served model; unset: GetModel offers no decoder")
    embedding_transport: TransportName = Field(
        TransportName.SHM,
        description="shm (Triton on this host) | grpc (embedding inline) | cuda (GPU Triton on this host, GPU 0)"
    )
    triton_timeout_s: float = Field(600.0, description="upper bound of one Triton call (client deadlines cut it)")
    max_request_bytes: int = Field(32 << 20, description="largest request message; larger -> RESOURCE_EXHAUSTED")
    max_image_pixels: int = Field(64_000_000, description="largest image (width*height); larger -> INVALID_ARGUMENT")
    max_response_bytes: int = Field(
        256 << 20, description="largest answer: bytes of masks (RLE, PNG) and logits; more -> RESOURCE_EXHAUSTED")
    max_decoding_pixels: int = Field(
        128_000_000, description="image pixels decoded at once per gateway (about 7 bytes each); more wait")
    max_prompts: int = Field(256, description="prompts per Segment request")
    max_points_per_prompt: int = Field(64, description="points per prompt")
    max_segment_mask_pixels: int = Field(
        1 << 34,
        description="Segment: full-size mask pixels per request (masks x image pixels: the post-processing work); "
        "more -> RESOURCE_EXHAUSTED",
    )
    max_concurrent_encodes: int = Field(2, description="encoder calls in flight per gateway")
    max_queued_encodes: int = Field(32, description="encodes waiting beyond that; more -> RESOURCE_EXHAUSTED")
    max_generate_points: int = Field(
        16384,
        description="GenerateMasks: grid points per crop layer (points_per_side <= 128); more -> INVALID_ARGUMENT",
    )
    max_generate_points_per_batch: int = Field(256, description="GenerateMasks: largest points_per_batch")
    max_generate_decoder_prompts: int = Field(
        32768, description="GenerateMasks: decoder prompts per request (grid points x crops, all layers); more -> "
        "RESOURCE_EXHAUSTED naming this limit",
    )
    generate_decoder_calls_in_flight: int = Field(
        3, description="GenerateMasks: decoder calls of one request in flight (overlaps decoding and post-processing)"
    )
    shutdown_grace_s: float = Field(10.0, description="SIGTERM: seconds in-flight calls get to finish")
    max_connection_age_s: float = Field(
        300.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="the gateway sends GOAWAY on a client connection this long after it opened (gRPC adds +-10% "
        "jitter), so clients resolve the target again and reach gateways added since; 0 = never",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="after that GOAWAY, how long calls in flight on the connection get to finish before it is "
        "closed (calls still running then end UNAVAILABLE; the project's clients retry them)",
    )
    health_check_interval_s: float = Field(1.0, description="how often the gateway checks Triton's models")

    # Security (README "Security"): TLS and mutual TLS on the gRPC port, API keys with tenants.
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the gateway; with tls_key_file: TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key (unencrypted) of that certificate")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA(s) of client certificates: set = mutual TLS (clients without one are refused)"
    )
    auth: AuthMode = Field(
        AuthMode.API_KEYS, description="api-keys (needs api_keys_file and/or jwt_jwks_file) | off (anyone may call; "
        "logged as a warning)"
    )
    api_keys_file: Path | None = Field(None, description="JSON keys file (hashed tokens, tenants, allowed RPCs)")
    jwt_jwks_file: Path | None = Field(None, description="JWKS file: JWTs signed by its keys are accepted too")
    jwt_audience: str = Field("samserve", description="the `aud` a JWT must carry")
    jwt_issuer: str | None = Field(None, description="the `iss` a JWT must carry (unset: not checked)")
    jwt_tenant_claim: str = Field("tenant", description="the JWT claim that names the tenant")
    reflection: bool = Field(False, description="serve gRPC server reflection (with auth on: to any valid key)")
    cache_scope: CacheScope | None = Field(
        None, description="shared (any caller's image is a hit for all) | tenant (each tenant its own entries); "
        "unset: tenant with auth on, shared with auth off",
    )

    # Embedding cache.
    l1_cache_bytes: int = Field(
        512 << 20, description="tier 1 capacity: embeddings, counted twice with the shm transport"
    )
    l1_image_bytes: int = Field(
        256 << 20, ge=0, description="tier 1 capacity for encoded image bytes (kept next to the embeddings so that an "
        "image_id alone can be embedded again, crops included); 0 = none in process (tier 2 still keeps them)",
    )
    redis_url: str | None = Field(None, description="tier 2, e.g. redis://127.0.0.1:6379/0; unset = tier 1 only")
    redis_cluster: bool = Field(False, description="redis_url points at a Redis Cluster node")
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (AUTH; the user, if any, goes in the URL)")
    redis_tls_ca_file: Path | None = Field(None, description="rediss:// only: PEM CA of Redis' certificate")
    redis_tls_cert_file: Path | None = Field(None, description="rediss:// only: PEM client certificate (mutual TLS)")
    redis_tls_key_file: Path | None = Field(None, description="rediss:// only: PEM key of that certificate")
    redis_ttl_s: int = Field(24 * 3600, description="how long tier 2 keeps an embedding")
    redis_timeout_s: float = Field(1.0, description="per Redis operation; slower counts as a failure")
    redis_lock_ttl_s: float = Field(120.0, description="single-flight lock lifetime (a crashed holder's lock expires)")
    failure_log_interval_s: float = Field(30.0, description="Redis failures are logged at most once per interval")

    @property
    def effective_cache_scope(self) -> CacheScope:
        """:attr:`cache_scope`, or its default for the auth mode."""
        if self.cache_scope is not None:
            return self.cache_scope
        return CacheScope.SHARED if self.auth is AuthMode.OFF else CacheScope.TENANT

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"

    @property
    def gateway_target(self) -> str:
        return f"{self.gateway_host}:{self.gateway_port}"


class StackSettings(GatewaySettings):
    """What ``samserve up`` adds: the Triton and Redis processes it launches on this machine."""

    workdir: Path = Field(Path(".samserve"), description="folder for generated artifacts")
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    triton_start_timeout_s: float = Field(300.0, description="how long to wait for Triton's models to be ready")
    triton_log_verbose: int = 0
    redis_server_port: int = Field(6379, description="port of the redis-server that `samserve up` starts")

    @property
    def repository(self) -> Path:
        """The rendered Triton model repository (``samserve-build prepare`` writes it)."""
        return self.workdir / "repository"


class ClientSettings(BaseSettings):
    """What a client of the gateway reads (``samserve segment`` / ``generate-masks``, the Locust users):
    ``SAMSERVE_CLIENT_<NAME>``. TLS is on when ``tls`` is set or any file is given."""

    model_config = SettingsConfigDict(env_prefix="SAMSERVE_CLIENT_", extra="ignore")

    token: str | None = Field(None, description="API key, sent as 'authorization: Bearer <token>'")
    tls: bool = Field(False, description="TLS, trusting the system's CAs unless ca_file is set")
    ca_file: Path | None = Field(None, description="PEM CA that signed the gateway's certificate")
    cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="PEM key of the client certificate")
    server_name: str | None = Field(None, description="name to verify the gateway's certificate for (not the host)")
    retry_attempts: int = Field(
        5, ge=1, le=5,
        description="attempts per call (the first included) when the gateway answers UNAVAILABLE; 1 = no retries",
    )
    keepalive_s: float = Field(
        10.0, ge=5.0, description="seconds between pings while calls are in flight: a gateway that does not answer "
        "one within 5 s is dropped and its calls retried on the others (at least 5: the gateway refuses faster pings)",
    )
