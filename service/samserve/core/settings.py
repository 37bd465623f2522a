"""The settings objects. Every knob is an environment variable ``SAMSERVE_<NAME>`` (docs/settings.md, generated from
the descriptions below).

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
    """How embeddings and decoder outputs travel between gateway and Triton (see :mod:`samserve.triton.transports`)."""

    GRPC = "grpc"
    SHM = "shm"
    CUDA = "cuda"


class AuthMode(enum.StrEnum):
    """Who may call the gateway's API (health checks are always open)."""

    API_KEYS = "api-keys"
    """Bearer credentials: API keys (api_keys_file) and/or JWTs (jwt_jwks_file)."""
    OFF = "off"


class CacheScope(enum.StrEnum):
    """Who shares cached embeddings (docs/security.md, cache scope)."""

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

    log_level: LogLevel = Field(
        LogLevel.INFO, description="the lowest level logged; every record carries the RPC's request id")

    # Triton Inference Server, as a client sees it.
    triton_host: str = Field(
        "127.0.0.1", description="Triton's address as the gateway calls it (`samserve up`: the address Triton binds); "
        "a `dns:///<name>` of several Triton pods (a headless Service) spreads the calls round robin, resolved again "
        "per SAMSERVE_TRITON_CHANNEL_MAX_AGE_S (`grpc` transport only: shared memory needs Triton on the gateway's "
        "host)",
    )
    triton_grpc_port: int = Field(8001, description="Triton's gRPC port: what the gateway calls")
    triton_channel_max_age_s: float = Field(
        60.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="the gateway's channel to Triton is replaced by a new one this long after it was made (at the "
        "next call; calls in flight finish on the old one), so a SAMSERVE_TRITON_HOST that is a `dns:///` name of "
        "several Triton pods is resolved again and pods added by a scale-up get calls; 0 = keep one channel",
    )

    # Gateway (gRPC API samserve.v1.SegmentAnything).
    gateway_host: str = Field(
        "127.0.0.1", description="address the gateway's ports (gRPC, HTTP, metrics, health) bind, e.g. `0.0.0.0`; "
        "the client commands' default target is this host and SAMSERVE_GATEWAY_PORT")
    gateway_port: int = Field(50051, description="gateway gRPC port, grpc.health.v1 included (0 = pick a free one)")
    metrics_port: int = Field(9464, description="gateway Prometheus /metrics port")
    health_port: int | None = Field(
        None, description="plaintext gRPC port serving only grpc.health.v1 (Kubernetes' gRPC probes when the API "
        "port has TLS); unset: none")
    http_port: int | None = Field(
        8080, description="HTTP/JSON API, the web page (`/`) and /openapi.json (same TLS, auth, limits and metrics as "
        "gRPC; 0 = pick a free one); `none`: no HTTP")
    http_cors_origins: list[str] = Field(
        [], description="origins (JSON list, e.g. [\"https://app.example\"]) whose web pages may call the HTTP API "
        "from a browser (CORS); empty: same origin only")
    client_decoder_dir: Path | None = Field(
        None, description="exported model folder (metadata.json + decoder.onnx) whose decoder clients may download "
        "for client-side decoding, given out only while it is the served model; unset: GetModel offers no decoder "
        "(`samserve up` sets the rendered repository's decoder)")
    embedding_transport: TransportName = Field(
        TransportName.SHM,
        description="shm: embeddings reach the decoder through Triton system shared memory (Triton on this host); "
        "grpc: inline in the calls; cuda: staged once in GPU 0's memory (CUDA shared memory: a GPU Triton on this "
        "host, `cuda-python` installed)"
    )
    triton_timeout_s: float = Field(600.0, description="upper bound of one Triton call (client deadlines cut it)")
    max_request_bytes: int = Field(32 << 20, description="largest request message; larger -> RESOURCE_EXHAUSTED")
    max_image_pixels: int = Field(
        64_000_000, description="largest image (width*height), checked before decoding; larger -> INVALID_ARGUMENT")
    max_response_bytes: int = Field(
        256 << 20, description="largest answer: bytes of masks (RLE, PNG) and logits, counted as they are made; more "
        "-> RESOURCE_EXHAUSTED naming this limit")
    max_decoding_pixels: int = Field(
        128_000_000, description="image pixels decoded at once per gateway (a decode peaks at about 7 bytes per "
        "pixel); more wait their turn (an image over it is decoded alone)")
    max_prompts: int = Field(256, description="prompts per Segment request; more -> INVALID_ARGUMENT")
    max_points_per_prompt: int = Field(64, description="points per prompt")
    max_segment_mask_pixels: int = Field(
        1 << 34,
        description="Segment: full-size mask pixels per request, masks x image pixels (the post-processing work: 256 "
        "multimask prompts on a 12 MP photo are 9.2e9, about a minute on 2 cores); more -> RESOURCE_EXHAUSTED naming "
        "this limit",
    )
    max_concurrent_encodes: int = Field(2, description="encoder calls in flight per gateway")
    max_queued_encodes: int = Field(32, description="encodes waiting beyond that; more -> RESOURCE_EXHAUSTED")
    max_generate_points: int = Field(
        16384,
        description="GenerateMasks: grid points per crop layer (points_per_side <= 128); more -> INVALID_ARGUMENT",
    )
    max_generate_points_per_batch: int = Field(
        256, description="GenerateMasks: largest points_per_batch (decoder memory grows with it)")
    max_generate_decoder_prompts: int = Field(
        32768, description="GenerateMasks: decoder prompts per request, grid points x crops over all layers "
        "(points_per_side 32 with crop_n_layers 1 is 5120); more -> RESOURCE_EXHAUSTED naming this limit",
    )
    generate_decoder_calls_in_flight: int = Field(
        3, description="GenerateMasks: decoder calls of one request in flight (overlaps decoding and post-processing; "
        "each holds one batch of logits)"
    )
    interact_max_sessions: int = Field(
        64, ge=1, description="Interact: sessions open at once per gateway; more -> RESOURCE_EXHAUSTED naming this "
        "limit (a session holds its undo history: up to 3 x SAMSERVE_INTERACT_MAX_HISTORY low-res logit planes of "
        "256 KiB, a single click keeping its 3 candidates)")
    interact_max_sessions_per_tenant: int = Field(
        16, ge=1, description="Interact: sessions open at once per tenant (auth on; with auth off only the gateway's "
        "limit applies); more -> RESOURCE_EXHAUSTED naming this limit")
    interact_idle_timeout_s: float = Field(
        300.0, gt=0, allow_inf_nan=False, description="Interact: a session with no event for this long ends "
        "DEADLINE_EXCEEDED, and its slot is freed")
    interact_max_history: int = Field(
        32, ge=1, description="Interact: states a session keeps for undo (older ones are forgotten: undo stops there)")
    shutdown_grace_s: float = Field(10.0, description="SIGTERM: seconds in-flight calls get to finish")
    max_connection_age_s: float = Field(
        300.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="the gateway sends GOAWAY on a client connection this long after it opened (gRPC adds +-10% "
        "jitter), so clients resolve the target again and reach gateways added by a scale-up (new calls never fail); "
        "keep it above 30: gRPC clients resolve a `dns:///` name at most every 30 s; 0 = never",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0, le=MAX_CHANNEL_AGE_S, allow_inf_nan=False,
        description="after that GOAWAY, how long calls in flight on the connection get to finish before it is "
        "closed (calls still running then end UNAVAILABLE; the project's clients retry them)",
    )
    health_check_interval_s: float = Field(1.0, description="how often the gateway checks Triton's models")

    # Security (docs/security.md): TLS and mutual TLS on the gRPC port, API keys with tenants.
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gateway: with SAMSERVE_TLS_KEY_FILE, TLS on the gRPC and HTTP "
        "ports (unset: plaintext); re-read when it changes")
    tls_key_file: Path | None = Field(
        None, description="PEM private key (unencrypted) of that certificate; re-read when it changes")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA(s) of client certificates: set = mutual TLS (a client without a certificate from "
        "them is refused)"
    )
    auth: AuthMode = Field(
        AuthMode.API_KEYS, description="api-keys: every RPC but health needs a key from SAMSERVE_API_KEYS_FILE or a "
        "JWT verified by SAMSERVE_JWT_JWKS_FILE (neither set: the gateway does not start); off: anyone who reaches "
        "the port may call (a WARNING at start-up; `make up` sets off unless a keys file is given)"
    )
    api_keys_file: Path | None = Field(
        None, description="JSON keys file made by `samserve keys add` (hashed tokens, tenants, allowed RPCs; "
        "docs/security.md); re-read when it changes")
    jwt_jwks_file: Path | None = Field(
        None, description="JWKS file (an identity provider's public keys): JWTs signed by them are accepted as well "
        "as (or, without a keys file, instead of) API keys; re-read when it changes")
    jwt_audience: str = Field("samserve", description="the `aud` a JWT must carry")
    jwt_issuer: str | None = Field(None, description="the `iss` a JWT must carry (unset: not checked)")
    jwt_tenant_claim: str = Field("tenant", description="the JWT claim that names the tenant")
    reflection: bool = Field(False, description="serve gRPC server reflection (with auth on: to any valid key)")
    cache_scope: CacheScope | None = Field(
        None, description="shared: an image any tenant sent is a cache hit (and an image_id) for all; tenant: each "
        "tenant its own entries; unset: tenant with auth on, shared with auth off",
    )

    # Embedding cache.
    l1_cache_bytes: int = Field(
        512 << 20, description="tier 1 capacity for embeddings: 4 MiB per image for Meta's models (fp32), 8 MiB with "
        "the shm transport (process memory + shared memory)"
    )
    l1_image_bytes: int = Field(
        256 << 20, ge=0, description="tier 1 capacity for encoded image bytes (kept next to the embeddings so that an "
        "image_id alone can be embedded again, crops included; an LRU by bytes, images over "
        "SAMSERVE_MAX_REQUEST_BYTES are never kept); 0 = none in process (tier 2 still keeps them: `samserve:img:` "
        "keys, same TTL)",
    )
    redis_url: str | None = Field(
        None, description="tier 2, e.g. redis://10.0.0.5:6379/0 (rediss:// for TLS); unset = tier 1 only (`samserve "
        "up` starts a local redis-server, if installed, and sets it)")
    redis_cluster: bool = Field(False, description="SAMSERVE_REDIS_URL points at a Redis Cluster node")
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (AUTH; an ACL user goes in the URL: redis://user@host)")
    redis_tls_ca_file: Path | None = Field(
        None, description="rediss:// only: PEM CA of Redis' certificate (unset: the system's CAs)")
    redis_tls_cert_file: Path | None = Field(
        None, description="rediss:// only: PEM client certificate, for a Redis that requires one (mutual TLS)")
    redis_tls_key_file: Path | None = Field(None, description="rediss:// only: PEM key of that certificate")
    redis_ttl_s: int = Field(24 * 3600, description="how long tier 2 keeps an embedding")
    redis_timeout_s: float = Field(
        1.0, description="per Redis operation; slower counts as a failure (the request still succeeds)")
    redis_lock_ttl_s: float = Field(120.0, description="single-flight lock lifetime (a crashed holder's lock expires)")
    redis_refill_check_s: float = Field(
        2.0, ge=0, description="how often the gateway checks that Redis still holds its marker key; when Redis lost "
        "its keys (a restart without persistence), tier 1's images and embeddings are written back, so ids stay "
        "valid across a later gateway restart (one EXPIRE per check; 0 = never check)")
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

    workdir: Path = Field(
        Path(".samserve"), description="folder for generated artifacts: exported models, the rendered repository, "
        "the backend folder, logs")
    triton_http_port: int = Field(8000, description="Triton's HTTP port (health checks)")
    triton_metrics_port: int = Field(8002, description="Triton's Prometheus metrics port")
    triton_start_timeout_s: float = Field(300.0, description="how long to wait for Triton's models to be ready")
    triton_log_verbose: int = Field(0, description="Triton's --log-verbose level (0 = off)")
    redis_server_port: int = Field(6379, description="port of the redis-server that `samserve up` starts")

    @property
    def repository(self) -> Path:
        """The rendered Triton model repository (``samserve-build prepare`` writes it)."""
        return self.workdir / "repository"


class ClientSettings(BaseSettings):
    """What a client of the gateway reads (``samserve segment`` / ``generate-masks``, the Locust users):
    ``SAMSERVE_CLIENT_<NAME>``. TLS is on when ``tls`` is set or any file is given."""

    model_config = SettingsConfigDict(env_prefix="SAMSERVE_CLIENT_", extra="ignore")

    token: str | None = Field(
        None, description="API key, sent as `authorization: Bearer <token>` (the CLI also takes --token-file)")
    tls: bool = Field(
        False, description="TLS to the gateway, trusting the system's CAs unless SAMSERVE_CLIENT_CA_FILE is set "
        "(--tls); implied by any of the files below")
    ca_file: Path | None = Field(None, description="PEM CA that signed the gateway's certificate (--tls-ca)")
    cert_file: Path | None = Field(None, description="PEM client certificate for mutual TLS (--tls-cert)")
    key_file: Path | None = Field(None, description="PEM key of the client certificate (--tls-key)")
    server_name: str | None = Field(
        None, description="name the gateway's certificate must carry when it is not the target's host "
        "(--tls-server-name)")
    retry_attempts: int = Field(
        5, ge=1, le=5,
        description="attempts per call (the first included, at most 5) when the gateway answers UNAVAILABLE; waits "
        "random below 0.25 s x2.5 each time, at most 2 s (about 4.4 s in all); 1 = no retries",
    )
    keepalive_s: float = Field(
        10.0, ge=5.0, description="seconds between pings while calls are in flight: a gateway that does not answer "
        "one within 5 s is dropped and its calls retried on the others, a lost node as well as a dead process (at "
        "least 5: the gateway refuses faster pings)",
    )
