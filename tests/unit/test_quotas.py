"""Per-tenant quotas: the token bucket's arithmetic on a fake clock, limits from the keys file, refusals with a
retry-after (and without one when a call can never fit), the status details they become, the decoder work a
GenerateMasks run is charged for, and the cache scope setting."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError

from samserve.core import metrics
from samserve.core.settings import AuthMode, CacheScope, GatewaySettings
from samserve.security import quotas
from samserve.security.api_keys import KeyRing
from samserve.security.key_file import KeyFileError, add_key, read_key_file, set_limits
from samserve.security.quotas import Limit, QuotaExceeded, Quotas, TenantLimits, TokenBucket
from samserve.transport.status import status_details
from samserve.vision import amg


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_spends_and_refills_at_its_rate():
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # empty: one unit in 1/rate seconds
    assert bucket.take(3, 0.25) == pytest.approx(1.25)  # 0.5 there, 2.5 missing
    assert bucket.take(1, 0.5) == 0.0  # refilled to 1.0 by t=0.5 (a refusal took nothing)
    assert bucket.take(1, 100.0) == 0.0 and bucket.level == pytest.approx(3.0)  # never above capacity
    assert math.isinf(bucket.take(5, 100.0)) and bucket.level == pytest.approx(3.0)


def test_bucket_sizes_default_to_one_period_of_the_rate():
    limits = TenantLimits(requests_per_s=5, encodes_per_min=30, encodes_burst=3)
    assert limits.bucket_size(Limit.REQUESTS) == (5.0, 5.0)
    assert limits.bucket_size(Limit.ENCODES) == (0.5, 3.0)
    assert limits.bucket_size(Limit.DECODER_PROMPTS) is None
    assert TenantLimits(requests_per_s=0.5).bucket_size(Limit.REQUESTS) == (0.5, 1.0)  # room for one call
    with pytest.raises(ValidationError):
        TenantLimits(requests_per_s=0)
    with pytest.raises(ValidationError):
        TenantLimits(encodes_per_minute=3)  # type: ignore[call-arg]  # a typo is refused, not ignored


def test_a_tenant_over_quota_is_refused_with_the_wait_and_nothing_taken():
    clock = Clock()
    quota = Quotas(lambda tenant: TenantLimits(requests_per_s=2, requests_burst=2), clock).of("acme")
    before = metrics.QUOTA_REJECTIONS.labels("acme", "requests")._value.get()
    quota.charge(Limit.REQUESTS)
    quota.charge(Limit.REQUESTS)
    with pytest.raises(QuotaExceeded) as refused:
        quota.charge(Limit.REQUESTS)
    assert refused.value.retry_after_s == pytest.approx(0.5) and refused.value.limit is Limit.REQUESTS
    assert refused.value.quota == "tenant:acme/requests" and "requests_per_s 2" in str(refused.value)
    assert metrics.QUOTA_REJECTIONS.labels("acme", "requests")._value.get() == before + 1
    clock.now += 0.5
    quota.charge(Limit.REQUESTS)  # exactly refilled
    quota.charge(Limit.ENCODES, 1000)  # no encode limit: free


def test_a_call_bigger_than_the_bucket_is_refused_without_a_retry_after():
    quota = Quotas(lambda tenant: TenantLimits(decoder_prompts_per_min=600), Clock()).of("acme")
    with pytest.raises(QuotaExceeded) as refused:
        quota.charge(Limit.DECODER_PROMPTS, 601)
    assert refused.value.retry_after_s is None and "decoder_prompts_burst 600" in str(refused.value)
    quota.charge(Limit.DECODER_PROMPTS, 600)


def test_changed_limits_start_fresh_buckets_and_tenants_are_separate():
    limits = {"acme": TenantLimits(encodes_per_min=1)}
    tenant_quotas = Quotas(lambda tenant: limits.get(tenant, TenantLimits()), Clock())
    tenant_quotas.of("acme").charge(Limit.ENCODES)
    with pytest.raises(QuotaExceeded):
        tenant_quotas.of("acme").charge(Limit.ENCODES)
    tenant_quotas.of("other").charge(Limit.ENCODES, 50)  # unlimited tenant
    limits["acme"] = TenantLimits(encodes_per_min=2)
    tenant_quotas.of("acme").charge(Limit.ENCODES, 2)


def test_charge_uses_the_calls_quota_and_is_free_outside_one():
    quotas.charge(Limit.ENCODES, 10**9)  # no current quota: a benchmark or auth off
    quota = Quotas(lambda tenant: TenantLimits(encodes_per_min=1), Clock()).of("acme")
    token = quotas.current.set(quota)
    try:
        quotas.charge(Limit.ENCODES)
        with pytest.raises(QuotaExceeded):
            quotas.charge(Limit.ENCODES)
    finally:
        quotas.current.reset(token)


def test_the_keys_file_holds_limits_per_tenant_with_defaults(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "acme")
    document = json.loads(path.read_text())
    document["tenants"] = {"acme": {"requests_per_s": 50, "encodes_per_min": 120}}
    document["default_limits"] = {"requests_per_s": 5}
    path.write_text(json.dumps(document))
    ring = KeyRing(path)
    assert ring.limits("acme") == TenantLimits(requests_per_s=50, encodes_per_min=120)
    assert ring.limits("someone-else") == TenantLimits(requests_per_s=5)
    add_key(path, "beta")  # adding a key keeps the limits
    assert read_key_file(path).tenants["acme"].encodes_per_min == 120
    document = json.loads(path.read_text())
    document["tenants"] = {"bad tenant!": {}}
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="tenants"):
        read_key_file(path)


def test_refusals_carry_retry_info_and_quota_failure():
    error = QuotaExceeded("over", Limit.ENCODES, "acme", 1.25)
    status = status_details(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", error)
    failure, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(failure) and status.details[1].Unpack(retry)
    assert failure.violations[0].subject == "tenant:acme/encodes"
    assert retry.retry_delay.ToNanoseconds() == 1_250_000_000
    never = status_details(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", QuotaExceeded("x", Limit.ENCODES, "a", None))
    assert not any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in never.details)


def test_tenant_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "_tenant_labels", set())
    monkeypatch.setattr(metrics, "MAX_TENANT_LABELS", 2)
    assert [metrics.tenant_label(name) for name in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]


@pytest.mark.parametrize("params, expected", [
    (amg.AmgParams(), 32 * 32),
    (amg.AmgParams(points_per_side=32, crop_n_layers=1), 32 * 32 * 5),
    (amg.AmgParams(points_per_side=32, crop_n_layers=2, crop_n_points_downscale_factor=2),
     32 * 32 + 16 * 16 * 4 + 8 * 8 * 16),
    (amg.AmgParams(points_per_side=128, crop_n_layers=3), 128 * 128 * (1 + 4 + 16 + 64)),
])
def test_generate_masks_decoder_work_is_points_times_crops(params, expected):
    assert params.decoder_prompts() == expected
    crops = amg.crop_boxes((600, 800), params.crop_n_layers, params.crop_overlap_ratio)
    assert params.decoder_prompts() == sum(len(params.grids()[layer]) for _, layer in crops)


def test_cache_scope_defaults_to_tenant_with_auth_on():
    assert GatewaySettings(auth=AuthMode.API_KEYS).effective_cache_scope is CacheScope.TENANT
    assert GatewaySettings(auth=AuthMode.OFF).effective_cache_scope is CacheScope.SHARED
    assert GatewaySettings(auth=AuthMode.API_KEYS, cache_scope="shared").effective_cache_scope is CacheScope.SHARED


def test_set_limits_edits_one_tenant_or_the_defaults(tmp_path):
    path = tmp_path / "keys.json"
    entry, _ = add_key(path, "acme")
    set_limits(path, "acme", TenantLimits(encodes_per_min=30))
    set_limits(path, None, TenantLimits(requests_per_s=2))
    ring = KeyRing(path)
    assert ring.limits("acme") == TenantLimits(encodes_per_min=30)
    assert ring.limits("other") == TenantLimits(requests_per_s=2)
    set_limits(path, "acme", TenantLimits())  # nothing set: back to the defaults
    assert read_key_file(path).tenants == {} and [k.id for k in read_key_file(path).keys] == [entry.id]
    with pytest.raises(KeyFileError):
        set_limits(path, "no spaces allowed", TenantLimits(requests_per_s=1))
