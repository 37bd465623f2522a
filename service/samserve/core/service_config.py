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
* Connection age: a client resolves its target when it connects, then keeps its connections, so gateways added by
  a scale-up would get no calls from clients already running. The gateway sends GOAWAY on every connection after
  ``max_connection_age_s`` (:func:`server_connection_age_options`): the client's round_robin reconnects that
  address and asks its resolver to resolve the target again, so a ``dns:///`` target picks up the new addresses.
  GOAWAY is invisible to callers: calls in flight finish on the old connection (for up to
  ``max_connection_age_grace_s``, after which the rest end UNAVAILABLE and are retried as above), calls sent while
  the GOAWAY was on its way are retried transparently. gRPC resolves a ``dns:///`` name at most once per 30 s per
  channel (``grpc.dns_min_time_between_resolutions_ms``), so an age below that delays the new addresses to the
  next 30 s mark.
* The gateway's own channel to Triton (:mod:`samserve.triton.models`) balances round robin too
  (:func:`round_robin_options`), and since Triton cannot be told to send GOAWAY, it is renewed from this side: an
  :class:`AgingChannel` is replaced by a new channel, which resolves its target afresh, once it is old enough.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Callable

import grpc

from samserve.core.api import SERVICE_NAME, UNARY_METHOD_NAMES
from samserve.core.settings import MAX_CHANNEL_AGE_S

DEFAULT_ATTEMPTS = 5
"""Attempts per call, the first included (gRPC's own upper bound)."""
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0
BACKOFF_MULTIPLIER = 2.5
"""With 5 attempts the waits are drawn below 0.25, 0.625, 1.5625 and 2 s: a call rides out up to ~4.4 s of
unavailability (~2.2 s on average), about a gateway restart or a short Triton restart."""
RETRYABLE_CODES = ("UNAVAILABLE",)
IDEMPOTENT_METHODS = UNARY_METHOD_NAMES
"""Every unary RPC of samserve.v1.SegmentAnything: none changes state a retry could apply twice (an Interact
session is not retried: its client opens a new one)."""


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


def _age_ms(name: str, seconds: float) -> int:
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_CHANNEL_AGE_S):
        raise ValueError(f"{name} must be a number of seconds from 0 to {MAX_CHANNEL_AGE_S:.0f}, not {seconds}")
    return round(seconds * 1000)


def server_connection_age_options(age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """Server arguments that send GOAWAY on a connection ``age_s`` after it opened (gRPC adds +-10 % jitter) and
    close it ``grace_s`` later; none for ``age_s`` 0 (connections are kept as long as they live)."""
    age_ms, grace_ms = _age_ms("max_connection_age_s", age_s), _age_ms("max_connection_age_grace_s", grace_s)
    if age_ms == 0:
        return []
    return [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", grace_ms)]


def round_robin_options() -> list[tuple[str, str]]:
    """Channel arguments that send calls in turn to every address the target resolves to (gRPC's default,
    pick_first, sends all of them to the first that connects); for channels without our service config."""
    return [("grpc.lb_policy_name", "round_robin")]


class AgingChannel:
    """A grpc.aio channel that :meth:`get` replaces by a new one from ``make`` once it is ``max_age_s`` old (0 =
    never), so that its target is resolved again: gRPC resolves a ``dns:///`` name when a channel connects, then
    only when a connection fails or the server sends GOAWAY, so addresses added later would get no calls.

    The replaced channel takes no new calls; calls in flight on it finish, for up to ``drain_s`` (after which they
    are cancelled), then it closes. A renewal costs a DNS lookup: connections to addresses both channels resolve
    are shared by gRPC's subchannel pool. ``first``: the first channel (default: ``make()``)."""

    def __init__(self, make: Callable[[], grpc.aio.Channel], max_age_s: float, drain_s: float,
                 first: grpc.aio.Channel | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(max_age_s) and max_age_s >= 0):
            raise ValueError(f"max_age_s must be a finite number of seconds >= 0, not {max_age_s}")
        if not drain_s >= 0:
            raise ValueError(f"drain_s must be a number of seconds >= 0, not {drain_s}")
        self._make = make
        self.max_age_s = max_age_s
        self.drain_s = drain_s
        self._clock = clock
        self._channel = first if first is not None else make()
        self._made_at = clock()
        self._draining: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.renewals = 0
        """How many times the channel was replaced."""

    def get(self) -> grpc.aio.Channel:
        """The channel for a new call (a new one when the current one is old; call it inside the event loop)."""
        if self.max_age_s > 0 and self._clock() - self._made_at >= self.max_age_s:
            old, self._channel = self._channel, self._make()
            self._made_at = self._clock()
            self.renewals += 1
            closing = asyncio.get_running_loop().create_task(old.close(self.drain_s))
            self._draining[closing] = old
            closing.add_done_callback(lambda task: self._draining.pop(task, None))
        return self._channel

    @property
    def draining(self) -> int:
        """Replaced channels not closed yet (calls still in flight on them)."""
        return len(self._draining)

    async def close(self) -> None:
        """Close the current channel now (its calls are cancelled). Replaced channels still draining go on draining
        in the background (gRPC offers no way to cut a graceful close short): their calls finish, or are cancelled
        ``drain_s`` after the renewal, unless the event loop ends first."""
        await self._channel.close()


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
