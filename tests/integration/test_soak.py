"""The chaos soak, 60-second version (bench/soak.py runs the same code for 10 minutes and writes the figures).

Two gateways sharing a Redis, one Triton (the tiny model), a fixed-rate load whose every answer is compared with the
fault-free answer, and the faults of tools/samserve_dev/soak.py on a schedule. Asserts the issue's targets: 0 wrong
answers; 0 failed calls through the Redis faults and the rolling restart (clients retry UNAVAILABLE); only
UNAVAILABLE around the Triton restart and full service within 30 s of Triton ready; the memory-limited gateway
stays up under several ~60-megapixel images at once, each answered or refused with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import pytest

from samserve_dev import soak
from samserve_dev.served_models import ExportedModel

DURATION_S = 60.0


@pytest.fixture(scope="module")
def result(tiny_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> soak.SoakResult:
    return soak.run_soak(tiny_model.directory, tmp_path_factory.mktemp("soak"), DURATION_S, rate_per_s=6.0,
                         big_image_count=4, memory_limit_bytes=1536 << 20, progress=lambda line: None)


def _report(result: soak.SoakResult, *faults: str) -> str:
    return "\n".join(f"{entry['name']} #{entry['cycle']}: {entry}" for entry in result.summary["phases"]
                     if entry["name"] in faults or entry["name"].removeprefix("after_") in faults)


def test_every_fault_ran_under_load(result: soak.SoakResult):
    ran = [phase.fault for phase in result.phases if phase.fault]
    assert ran == list(soak.FAULTS)
    assert all(entry["requests"] > 0 for entry in result.summary["phases"]), _report(result, *ran)


def test_no_wrong_answer_passes(result: soak.SoakResult):
    assert result.targets["no_wrong_answers"]["met"], result.targets["no_wrong_answers"]
    assert sum(c.verdict is not None for c in result.calls) > 0


def test_no_failed_call_through_the_redis_faults(result: soak.SoakResult):
    target = result.targets["redis_faults_no_failed_calls"]
    assert target["met"], _report(result, "redis_sigkill", "after_redis_sigkill", "redis_slow", "after_redis_slow")


def test_no_failed_call_through_the_rolling_restart(result: soak.SoakResult):
    target = result.targets["rolling_restart_no_failed_calls"]
    assert target["met"], _report(result, "gateway_rolling_restart", "after_gateway_rolling_restart")


def test_the_triton_restart_fails_calls_only_with_unavailable_and_recovers_within_30s(result: soak.SoakResult):
    for name in ("triton_restart_only_unavailable", "triton_recovery_within_30s"):
        assert result.targets[name]["met"], (result.targets[name], _report(result, "triton_sigkill",
                                                                           "after_triton_sigkill"))


def test_client_retries_answer_calls_made_while_triton_was_down(result: soak.SoakResult):
    """Calls started while Triton was down (well before it was ready again) and answered OK: only a retry after
    Triton came back can answer them. The probe without retries, at the same time, sees UNAVAILABLE."""
    answered = result.summary["by_fault"]["triton_sigkill"]["ok_started_during_outage"]
    assert answered > 0, _report(result, "triton_sigkill")
    probe = result.probe_summary["by_fault"]["triton_sigkill"]["failures_by_code"]
    assert set(probe) == {"UNAVAILABLE"}, result.probe_summary["by_fault"]


def test_the_memory_limited_gateway_stays_up(result: soak.SoakResult):
    target = result.targets["memory_limited_gateway_stays_up"]
    (run,) = soak.fault_runs(result.summary, "memory_limited_gateway")
    details = run["details"]
    shown = ("limit", "limit_bytes", "codes", "alive", "health_after", "exit_code", "cgroup_peak_bytes", "oom_kills")
    assert target["met"], "; ".join(f"{key} {details.get(key)}" for key in shown)
    assert result.targets["big_images_rejected_or_queued"]["met"], details.get("codes")

