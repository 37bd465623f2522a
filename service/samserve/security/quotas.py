"""Per-tenant quotas: token buckets for requests, encoder runs and decoder prompts (docs/security.md).

Each tenant of the keys file (:mod:`samserve.security.api_keys`) may have limits (its ``tenants`` entry, else the file's
``default_limits``; neither: unlimited). One bucket per limit and tenant holds up to ``burst`` units and refills at
``rate`` units per second; a call takes what it costs or is refused with RESOURCE_EXHAUSTED and the time until the
bucket holds enough (``retry_after_s``, sent as ``retry-after`` trailing metadata and ``google.rpc.RetryInfo``).

What costs what (:class:`Limit`):

* ``requests``: 1 per RPC, taken by :class:`samserve.transport.interceptors.QuotaInterceptor` before the servicer runs;
* ``encodes``: 1 per encoder run this gateway starts for the tenant (a cache hit, or waiting on another caller's
  encode of the same image, is free), taken by the embedder just before the encoder runs;
* ``decoder_prompts``: a Segment's prompts, a GenerateMasks' planned grid points over all crops, one per decode of an
  Interact session, taken by the
  servicer before any decoder call.

Buckets live in each gateway replica: with N replicas a tenant may use up to N times its limits (like Envoy's
local rate limit; it needs no shared store on the hot path).

The tenant's quota for the call being served is in the context variable :data:`current` (set by the quota
interceptor); :func:`charge` takes from it and does nothing when it is unset (auth off, or a benchmark calling
the embedder directly).
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import math
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from samserve.core import metrics
from samserve.core.errors import ResourceExhausted


class Limit(enum.StrEnum):
    """What a bucket counts."""

    REQUESTS = "requests"
    ENCODES = "encodes"
    DECODER_PROMPTS = "decoder_prompts"


@dataclasses.dataclass(frozen=True)
class _LimitFields:
    rate: str
    """TenantLimits field of the rate."""
    burst: str
    """TenantLimits field of the bucket size."""
    period_s: float
    """The rate's unit of time; the default bucket holds one period's worth."""


LIMIT_FIELDS: dict[Limit, _LimitFields] = {
    Limit.REQUESTS: _LimitFields("requests_per_s", "requests_burst", 1.0),
    Limit.ENCODES: _LimitFields("encodes_per_min", "encodes_burst", 60.0),
    Limit.DECODER_PROMPTS: _LimitFields("decoder_prompts_per_min", "decoder_prompts_burst", 60.0),
}


class TenantLimits(BaseModel):
    """A tenant's limits in the keys file (unset: that limit does not apply). A ``*_burst`` is the bucket size:
    what may be spent at once after a quiet period (default: one second of requests, one minute of encodes and of
    decoder prompts). A single call costing more than its bucket holds is refused without a retry-after."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: PositiveFloat | None = Field(None, description="RPCs per second")
    requests_burst: PositiveInt | None = None
    encodes_per_min: PositiveFloat | None = Field(None, description="encoder runs per minute (cache misses)")
    encodes_burst: PositiveInt | None = None
    decoder_prompts_per_min: PositiveFloat | None = Field(
        None, description="decoder prompts per minute (Segment prompts; GenerateMasks grid points x crops; 1 per "
        "Interact decode)")
    decoder_prompts_burst: PositiveInt | None = None

    def bucket_size(self, limit: Limit) -> tuple[float, float] | None:
        """(rate per second, bucket size) of ``limit``, None when it does not apply."""
        fields = LIMIT_FIELDS[limit]
        rate = getattr(self, fields.rate)
        if rate is None:
            return None
        burst = getattr(self, fields.burst)
        return rate / fields.period_s, float(burst if burst is not None else max(1.0, rate))


class TokenBucket:
    """``capacity`` units, refilled at ``rate_per_s``; starts full."""

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0.0, or take nothing and return the seconds until the bucket will hold it
        (``math.inf`` when it never can: more than its capacity)."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if amount > self.capacity:
            return math.inf
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate_per_s


class QuotaExceeded(ResourceExhausted):
    """A tenant's bucket cannot pay for the call. ``retry_after_s``: when it could (None: never, the call costs
    more than the bucket holds)."""

    def __init__(self, message: str, limit: Limit, tenant: str, retry_after_s: float | None) -> None:
        super().__init__(message, retry_after_s=retry_after_s, quota=f"tenant:{tenant}/{limit.value}")
        self.limit = limit


class TenantQuota:
    """The buckets of one tenant under one version of its limits."""

    def __init__(self, tenant: str, limits: TenantLimits, clock: Callable[[], float]) -> None:
        self.tenant = tenant
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()  # the embedder charges from the event loop; benchmarks may use threads
        now = clock()
        self._buckets = {limit: TokenBucket(*size, now) for limit in Limit
                         if (size := limits.bucket_size(limit)) is not None}

    def charge(self, limit: Limit, amount: float = 1.0) -> None:
        """Take ``amount`` units of ``limit``, or raise :class:`QuotaExceeded` (nothing taken)."""
        bucket = self._buckets.get(limit)
        label = metrics.tenant_label(self.tenant)
        if bucket is not None:
            with self._lock:
                wait_s = bucket.take(amount, self._clock())
            if wait_s:
                metrics.QUOTA_REJECTIONS.labels(label, limit.value).inc()
                fields = LIMIT_FIELDS[limit]
                rate = getattr(self.limits, fields.rate)
                if math.isinf(wait_s):
                    raise QuotaExceeded(
                        f"this call needs {amount:g} {limit.value}, more than tenant {self.tenant!r} may spend at "
                        f"once ({fields.burst} {bucket.capacity:g}): send smaller requests", limit, self.tenant, None)
                raise QuotaExceeded(
                    f"tenant {self.tenant!r} is over its quota of {limit.value} ({fields.rate} {rate:g}); "
                    f"retry after {wait_s:.3f} s", limit, self.tenant, wait_s)
        metrics.TENANT_USAGE.labels(label, limit.value).inc(amount)


class Quotas:
    """Every tenant's :class:`TenantQuota`; ``limits_of(tenant)`` gives its current limits (the keys file is
    re-read when it changes: changed limits start fresh buckets)."""

    def __init__(self, limits_of: Callable[[str], TenantLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits_of = limits_of
        self.clock = clock
        self._tenants: dict[str, TenantQuota] = {}

    def of(self, tenant: str) -> TenantQuota:
        limits = self.limits_of(tenant)
        quota = self._tenants.get(tenant)
        if quota is None or quota.limits != limits:
            quota = self._tenants[tenant] = TenantQuota(tenant, limits, self.clock)
        return quota


current: contextvars.ContextVar[TenantQuota | None] = contextvars.ContextVar("samserve_quota", default=None)
"""The quota of the tenant the RPC being served is for (None: no quotas apply)."""


def charge(limit: Limit, amount: float = 1.0) -> None:
    """Charge the current call's tenant (:data:`current`); no-op without one."""
    quota = current.get()
    if quota is not None:
        quota.charge(limit, amount)
