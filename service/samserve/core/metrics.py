"""Gateway metrics (Prometheus naming: base units, ``_seconds``, ``_bytes``, ``_total``), served on the metrics port.

Latency buckets span this workload: a hot Segment is milliseconds, a cold ViT-H encode on a CPU is minutes.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from samserve.core.api import METHOD_NAMES

LOG = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
"""1 ms (hot prompts, cache lookups) to 5 min (ViT-H encoder on a CPU)."""
PROMPT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(1, 10))  # 4 KiB .. 256 MiB
PIXEL_BUCKETS = tuple(float(v) for v in (1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8))

RPC_REQUESTS = Counter("samserve_rpc_requests_total", "Gateway RPCs by method and status code", ["method", "code"])
HTTP_REQUESTS = Counter(
    "samserve_http_requests_total", "HTTP/JSON API requests by RPC and HTTP status (each is also an RPC above, "
    "unless the transport refused it first)", ["method", "status"])
RPC_DURATION = Histogram("samserve_rpc_duration_seconds", "Gateway RPC latency by method and status code",
                         ["method", "code"], buckets=LATENCY_BUCKETS)
INFLIGHT = Gauge("samserve_inflight_requests", "RPCs being served now", ["method"])
CACHE_LOOKUPS = Counter("samserve_cache_lookups_total", "Embedding cache lookups by tier and result",
                        ["tier", "result"])
CACHE_L1_BYTES = Gauge("samserve_cache_l1_bytes", "Bytes of embeddings held in tier 1 (in process)")
IMAGE_STORE_LOOKUPS = Counter("samserve_image_store_lookups_total", "Image bytes store lookups (an image_id whose "
                              "embedding must be computed) by tier and result", ["tier", "result"])
IMAGE_STORE_L1_BYTES = Gauge("samserve_image_store_l1_bytes", "Bytes of encoded images held in tier 1 (in process)")
TIER2_REFILLED = Counter("samserve_tier2_refilled_total", "Tier-1 records written back to Redis after Redis lost "
                         "its keys (samserve.cache.refill), by kind (image, embedding)", ["kind"])
SINGLE_FLIGHT_WAITS = Counter("samserve_single_flight_waits_total",
                              "Requests that waited for another request's (or replica's) encode of the same image")
ENCODES = Counter("samserve_encodes_total", "Encoder runs started by this gateway")
TRITON_CALL = Histogram("samserve_triton_call_duration_seconds", "Triton calls as the gateway sees them",
                        ["model"], buckets=LATENCY_BUCKETS)
DECODER_BATCH_PROMPTS = Histogram("samserve_decoder_batch_prompts", "Prompts per decoder call",
                                  buckets=PROMPT_BUCKETS)
IMAGE_BYTES = Histogram("samserve_image_bytes", "Encoded image bytes received", buckets=BYTES_BUCKETS)
IMAGE_PIXELS = Histogram("samserve_image_pixels", "Pixels (width x height) of decoded images", buckets=PIXEL_BUCKETS)
GENERATED_MASKS = Histogram("samserve_generate_masks_masks", "Masks returned per GenerateMasks call",
                            buckets=(0, 1, 10, 25, 50, 100, 200, 400, 800, 1600))
GENERATE_POINTS = Counter("samserve_generate_masks_points_total", "Grid points decoded by GenerateMasks")
INTERACT_SESSIONS = Gauge("samserve_interact_sessions", "Interact sessions open now")
INTERACT_EVENTS = Counter("samserve_interact_events_total", "Interact events by outcome: decoded (answered by a "
                          "decoder call), history (answered from the session's history: undo, a choice), superseded "
                          "(folded into a later state before its decode)", ["outcome"])
INTERACT_EVENT_SECONDS = Histogram("samserve_interact_event_seconds", "Interact: from an event's arrival to its "
                                   "answer, by outcome (decoded, history)", ["outcome"], buckets=LATENCY_BUCKETS)
TENANT_REQUESTS = Counter("samserve_tenant_requests_total", "Gateway RPCs by tenant (of the API key; '-' with "
                          "auth off), method and status code", ["tenant", "method", "code"])
TENANT_USAGE = Counter("samserve_tenant_usage_total", "What tenants spent: requests, encodes, decoder_prompts",
                       ["tenant", "limit"])
QUOTA_REJECTIONS = Counter("samserve_quota_rejections_total", "Calls refused because a tenant's bucket was empty",
                           ["tenant", "limit"])
BUILD_INFO = Gauge("samserve_build_info", "Version and served model (value 1)",
                   ["version", "model_id", "weights_sha256"])


MAX_TENANT_LABELS = 100
"""Tenants named in metric labels; more distinct tenants than this share the label ``other`` (tenants come from
the operator's keys file, never from a caller, so the label set is bounded either way)."""
_tenant_labels: set[str] = set()


def tenant_label(tenant: str) -> str:
    """The ``tenant`` label value of ``tenant`` (:data:`MAX_TENANT_LABELS`)."""
    if tenant in _tenant_labels:
        return tenant
    if len(_tenant_labels) < MAX_TENANT_LABELS:
        _tenant_labels.add(tenant)
        return tenant
    return "other"


def _initialize_series() -> None:
    """Export the common series at 0 from the start, so that rate() sees their first increase."""
    for tier, result in (("l1", "hit"), ("l1", "miss"), ("l2", "hit"), ("l2", "miss"), ("l2", "error")):
        CACHE_LOOKUPS.labels(tier, result)
        IMAGE_STORE_LOOKUPS.labels(tier, result)
    for method in METHOD_NAMES:
        RPC_REQUESTS.labels(method, "OK")
        INFLIGHT.labels(method)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (0 picks a free one)."""
    _initialize_series()
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    LOG.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def set_build_info(version: str, model_id: str, weights_sha256: str) -> None:
    BUILD_INFO.clear()
    BUILD_INFO.labels(version=version, model_id=model_id, weights_sha256=weights_sha256).set(1)
