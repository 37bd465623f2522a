"""Reading a Prometheus text endpoint (the gateway's /metrics, Triton's :8002/metrics) into plain values."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at ``url``: {(name, sorted label pairs): value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value. A series that is absent fails (a metric that is not exported must not read as 0)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        raise AssertionError(f"metric {name}{labels} is not exported")
    return samples[key]


def local_samples() -> Samples:
    """Every sample of this process's default registry (a gateway built in process counts there)."""
    from prometheus_client import REGISTRY

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in REGISTRY.collect() for sample in family.samples
    }
