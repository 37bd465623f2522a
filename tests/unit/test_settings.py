"""The settings: every knob documented in the README, choices validated when a command reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from samserve.settings import AuthMode, ClientSettings, GatewaySettings, StackSettings, TransportName
from samserve_build.settings import BuildSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> set[str]:
    """Variables named in the README's settings table (``SAMSERVE_A`` / ``_B`` rows name two)."""
    names = set()
    for row in re.findall(r"^\| (`SAMSERVE_[^|]+)\|", README.read_text(), re.M):
        first, *more = re.findall(r"`([A-Z0-9_]+)`", row)
        names.add(first)
        prefix = first.rsplit("_", 2)[0] if first.endswith("_PORT") else first.rsplit("_", 1)[0]
        names.update(prefix + suffix for suffix in more)
    return names


def test_every_setting_is_documented_in_the_readme():
    fields = {f"SAMSERVE_{name.upper()}" for name in BuildSettings.model_fields}
    fields |= {f"SAMSERVE_CLIENT_{name.upper()}" for name in ClientSettings.model_fields}
    assert fields - documented() == set()


def test_the_gateway_reads_only_what_it_needs():
    gateway = set(GatewaySettings.model_fields)
    assert not gateway & {"workdir", "model_variant", "checkpoint", "target", "redis_server_port"}
    assert gateway < set(StackSettings.model_fields) < set(BuildSettings.model_fields)


def test_choices_are_validated_at_start_up(monkeypatch):
    monkeypatch.setenv("SAMSERVE_EMBEDDING_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ValidationError, match="'grpc', 'shm' or 'cuda'"):
        GatewaySettings()
    monkeypatch.setenv("SAMSERVE_EMBEDDING_TRANSPORT", "grpc")
    assert GatewaySettings().embedding_transport is TransportName.GRPC
    monkeypatch.setenv("SAMSERVE_LOG_LEVEL", "LOUD")
    with pytest.raises(ValidationError):
        GatewaySettings()
    monkeypatch.delenv("SAMSERVE_LOG_LEVEL")
    monkeypatch.delenv("SAMSERVE_AUTH", raising=False)
    assert GatewaySettings().auth is AuthMode.API_KEYS  # auth off only when said
    monkeypatch.setenv("SAMSERVE_AUTH", "none")
    with pytest.raises(ValidationError, match="'api-keys' or 'off'"):
        GatewaySettings()


def test_connection_and_channel_ages_are_read_and_must_be_finite_non_negative_seconds(monkeypatch):
    settings = GatewaySettings()
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (300.0, 30.0)
    assert settings.triton_channel_max_age_s == 60.0
    monkeypatch.setenv("SAMSERVE_MAX_CONNECTION_AGE_S", "2.5")
    monkeypatch.setenv("SAMSERVE_MAX_CONNECTION_AGE_GRACE_S", "0")
    monkeypatch.setenv("SAMSERVE_TRITON_CHANNEL_MAX_AGE_S", "0")
    settings = GatewaySettings()
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (2.5, 0.0)
    assert settings.triton_channel_max_age_s == 0.0
    for name in ("MAX_CONNECTION_AGE_S", "MAX_CONNECTION_AGE_GRACE_S", "TRITON_CHANNEL_MAX_AGE_S"):
        for value, complaint in (("-1", "greater than or equal to 0"), ("inf", "finite number"),
                                 ("nan", "finite number"), ("3e6", "less than or equal to")):
            monkeypatch.setenv(f"SAMSERVE_{name}", value)
            with pytest.raises(ValidationError, match=f"(?s){name.lower()}.*{complaint}"):
                GatewaySettings()
            monkeypatch.delenv(f"SAMSERVE_{name}")
