"""The gRPC service config of every client channel to the gateway: retries, load balancing and keepalive.

* Retries: Embed, Segment and GenerateMasks are idempotent (the same request gives the same answer, the cache
  makes a repeated Embed cheap), so a call that ends UNAVAILABLE (a gateway draining or gone, Triton not ready) is
  retried by gRPC itself, with exponential backoff: the n-th retry waits a random time in
  [0, min(``INITIAL_BACKOFF_S`` * ``BACKOFF_MULTIPLIER`` ** (n - 1), ``MAX_BACKOFF_S``)] (gRFC A6). ``attempts``
  counts the first call; gRPC treats values above 5 as 5; 1 turns configured retries off. Other codes are never
  retried (RESOURCE_EXHAUSTED means "send less or later", DEADLINE_EXCEEDED has used the caller's time).
  Separately, gRPC always retries *transparently* a call that never reached the server's application (refused by a
  GOAWAY, a connection lost before the stream started); such retries do not count against ``attempts``.
* Load balancing: ``round_robin`` over every address the target resolves to. A target listing several
  ``host:port`` addresses with IP literals (``127.0.0.1:50051,127.0.0.1:50052``) becomes one ``ipv4:``/``ipv6:``
  target, so a client spreads its calls over the gateways and keeps going while one is restarted (its draining
  gateway sends GOAWAY; new calls go to the others). In Kubernetes, give a ``dns:///`` name of a headless Service.
* Keepalive: a gateway whose process dies resets its connections, so its calls end UNAVAILABLE at once and are
  retried. A gateway whose host vanishes (a node lost, a network partition) sends nothing: without pings, its
  connection would look alive and round robin would keep sending calls into it until their deadlines. So while
  calls are in flight the client pings every ``keepalive_s`` and drops a connection whose ping is not answered in
  :data:`KEEPALIVE_TIMEOUT_S`: its calls end UNAVAILABLE and are retried on the other gateways. The gateway
  accepts pings as often as every :data:`MIN_KEEPALIVE_S` (:func:`server_keepalive_options`) and pings its own
  clients every :data:`SERVER_KEEPALIVE_S`, so work for a vanished client is cancelled.
"""

from __future__ import annotations

import ipaddress
import json

from samserve.api import METHOD_NAMES, SERVICE_NAME

DEFAULT_ATTEMPTS = 5
"""Attempts per call, the first included (gRPC's own upper bound)."""
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0
BACKOFF_MULTIPLIER = 2.5
"""With 5 attempts the waits are drawn below 0.25, 0.625, 1.5625 and 2 s: a call rides out up to ~4.4 s of
unavailability (~2.2 s on average), about a gateway restart or a short Triton restart."""
RETRYABLE_CODES = ("UNAVAILABLE",)
IDEMPOTENT_METHODS = METHOD_NAMES
"""Every RPC of samserve.v1.SegmentAnything: none changes state a retry could apply twice."""


KEEPALIVE_S = 10.0
"""Default seconds between a client's pings while it has calls in flight."""
MIN_KEEPALIVE_S = 5.0
"""The gateway closes a connection that pings more often than this (gRPC's "too many pings")."""
KEEPALIVE_TIMEOUT_S = 5.0
"""A ping unanswered for this long drops the connection (client and gateway alike)."""
SERVER_KEEPALIVE_S = 30.0
"""Seconds between the gateway's pings to its clients."""


def client_keepalive_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """Channel arguments of a client that pings every ``keepalive_s`` (>= :data:`MIN_KEEPALIVE_S`) while calls
    are in flight, however long a call stays silent."""
    if keepalive_s < MIN_KEEPALIVE_S:
        raise ValueError(f"keepalive_s must be at least {MIN_KEEPALIVE_S} (the gateway refuses faster pings), "
                         f"not {keepalive_s}")
    return [("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0)]


def server_keepalive_options() -> list[tuple[str, int]]:
    """Server arguments of the gateway: accept the clients' pings, ping the clients."""
    return [("grpc.http2.min_recv_ping_interval_without_data_ms", int(MIN_KEEPALIVE_S * 1000)),
            ("grpc.keepalive_time_ms", int(SERVER_KEEPALIVE_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.http2.max_pings_without_data", 0)]


def service_config(attempts: int = DEFAULT_ATTEMPTS) -> str:
    """The service config as JSON (the ``grpc.service_config`` channel argument). ``attempts`` >= 1."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1 (the first call), not {attempts}")
    method: dict[str, object] = {"name": [{"service": SERVICE_NAME, "method": name} for name in IDEMPOTENT_METHODS]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": f"{INITIAL_BACKOFF_S}s",
            "maxBackoff": f"{MAX_BACKOFF_S}s",
            "backoffMultiplier": BACKOFF_MULTIPLIER,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{address!r}: several addresses need IP literals; for names give one dns:/// target "
                         "that resolves to all of them") from None


def channel_target(target: str) -> str:
    """``target`` as gRPC resolves it: one address (or any URI) unchanged; a comma-separated list of ``ip:port``
    addresses as an ``ipv4:`` (or ``ipv6:``) target over all of them."""
    addresses = [a.strip() for a in target.split(",")]
    if len(addresses) == 1 or ":/" in target or target.startswith(("ipv4:", "ipv6:")):
        return target
    versions = {_ip_of(address).version for address in addresses}
    if len(versions) > 1:
        raise ValueError(f"{target!r} mixes IPv4 and IPv6 addresses")
    return f"ipv{versions.pop()}:" + ",".join(addresses)
