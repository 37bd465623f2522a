"""Metrics: the gateway's /metrics, and a real Prometheus (Debian's) scraping gateway and Triton with the
committed config and rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve_dev.images import new_image
from samserve_dev.local_stack import free_port
from samserve_dev.metrics import sample, scrape
from samserve_dev.polling import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: Debian's prometheus package (make installs it as root)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_rules():
    config = _promtool("check", "config", str(OBSERVABILITY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", str(OBSERVABILITY / "rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for series in ("samserve_rpc_requests_total", "samserve:cache_hit_ratio:rate5m", "samserve:rpc_error_ratio:rate5m",
                   "samserve:rpc_duration_seconds:p99_5m", 'nv_inference_pending_request_count{model="sam_encoder"}'):
        assert series in exprs


def test_gateway_metrics_count_what_happened(gateway_factory, tiny_triton, redis_server):
    gateway = gateway_factory(tiny_triton.url, redis_server.url)
    data = new_image()
    with SamServeClient(gateway.target) as client:
        image_id = client.embed(data).image_id
        for _ in range(3):
            client.segment(image_id, [PromptSpec(points=[(10, 10)], labels=[1]), PromptSpec(box=(0, 0, 50, 50))])
        with pytest.raises(grpc.RpcError):
            client.segment(image_id, [PromptSpec(points=[(1e6, 10)], labels=[1])])
    samples = scrape(gateway.metrics_url)

    def value(name: str, **labels: str) -> float:
        return sample(samples, name, **labels)

    assert value("samserve_rpc_requests_total", method="Segment", code="OK") == 3
    assert value("samserve_rpc_requests_total", method="Segment", code="INVALID_ARGUMENT") == 1
    assert value("samserve_rpc_requests_total", method="Embed", code="OK") == 1
    assert value("samserve_rpc_duration_seconds_count", method="Segment", code="OK") == 3
    assert value("samserve_cache_lookups_total", tier="l1", result="hit") == 4
    assert value("samserve_cache_lookups_total", tier="l2", result="miss") == 1
    assert value("samserve_encodes_total") == 1
    assert value("samserve_cache_l1_bytes") > 0
    assert value("samserve_triton_call_duration_seconds_count", model="sam_encoder") == 1
    assert value("samserve_triton_call_duration_seconds_count", model="sam_decoder") == 3  # 2 prompts, 1 batch
    assert value("samserve_decoder_batch_prompts_sum") == 6
    assert value("samserve_image_bytes_count") == 1 and value("samserve_image_pixels_sum") == 120 * 160
    assert value("samserve_inflight_requests", method="Segment") == 0
    assert value("samserve_build_info", version="0.1.0", model_id=tiny_triton.model.metadata.model_id,
                 weights_sha256=tiny_triton.model.metadata.weights_sha256) == 1


def render_config(tmp: Path, gateway_target: str, triton_metrics: str) -> Path:
    config = (OBSERVABILITY / "prometheus.yml").read_text()
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s",
                                                                                   "evaluation_interval: 1s")
    config = config.replace('"127.0.0.1:9464"', f'"{gateway_target}"')
    config = config.replace('"127.0.0.1:8002"', f'"{triton_metrics}"')
    shutil.copy(OBSERVABILITY / "rules.yml", tmp / "rules.yml")
    (tmp / "prometheus.yml").write_text(config)
    return tmp / "prometheus.yml"


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def query_or_nothing(base: str, promql: str) -> list[dict]:
    """The query's result; nothing while Prometheus is still starting."""
    try:
        return query(base, promql)
    except urllib.error.URLError:
        return []


def wait_for(base: str, promql: str, check, timeout_s: float = 60.0) -> list[dict]:
    """Poll the query until its result passes ``check`` (Prometheus scrapes and evaluates every second here)."""
    return wait_until(lambda: query_or_nothing(base, promql), lambda result: bool(result) and check(result), promql,
                      timeout_s=timeout_s, interval_s=0.25)


def test_real_prometheus_scrapes_gateway_and_triton(gateway_factory, tiny_triton, redis_server, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: Debian's prometheus package (make installs it as root)")
    gateway = gateway_factory(tiny_triton.url, redis_server.url)
    config = render_config(tmp_path, f"127.0.0.1:{gateway.metrics_port}",
                           f"127.0.0.1:{tiny_triton.server.metrics_port}")
    port = free_port()
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Traffic starts once Prometheus has seen the gateway (its counters at 0), as in production.
        wait_for(base, 'up{job="samserve-gateway"}', lambda r: float(r[0]["value"][1]) == 1)
        data = new_image()
        calls = 7
        with SamServeClient(gateway.target) as client:
            image_id = client.embed(data).image_id
            for _ in range(calls):
                client.segment(image_id, [PromptSpec(points=[(20, 20)], labels=[1])])
        wait_for(base, 'sum(samserve_rpc_requests_total{method="Segment",code="OK"})',
                 lambda r: float(r[0]["value"][1]) == calls)
        wait_for(base, 'up{job="triton"}', lambda r: float(r[0]["value"][1]) == 1)
        encoder = wait_for(base, 'nv_inference_count{model="sam_encoder"}', lambda r: float(r[0]["value"][1]) >= 1)
        assert encoder[0]["metric"]["job"] == "triton"
        ratio = wait_for(base, "samserve:cache_hit_ratio:rate5m", lambda r: 0.0 < float(r[0]["value"][1]) <= 1.0)
        assert float(ratio[0]["value"][1]) > 0.5  # 7 hot Segments after one Embed
        rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5).read())["data"]["groups"]
        assert {rule["health"] for group in rules for rule in group["rules"]} == {"ok"}
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
