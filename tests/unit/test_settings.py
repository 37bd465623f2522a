"""The settings: every knob documented in docs/settings.md (generated from the Field descriptions, checked current
here), choices validated when a command reads them."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys

import pytest
from pydantic import Field, ValidationError

from samserve.core.settings import AuthMode, ClientSettings, GatewaySettings, StackSettings, TransportName
from samserve.labelstudio.settings import LabelStudioSettings
from samserve_build.settings import BuildSettings
from samserve_dev import settings_doc

REGENERATE = "run python -m samserve_dev.settings_doc"


def test_docs_settings_md_is_what_the_generator_renders():
    rendered = settings_doc.render()
    current = settings_doc.DOC.read_text(encoding="utf-8") if settings_doc.DOC.exists() else ""
    if current != rendered:
        diff = difflib.unified_diff(current.splitlines(), rendered.splitlines(), "docs/settings.md", "rendered",
                                    lineterm="", n=0)
        pytest.fail(f"docs/settings.md is not what the settings' Field descriptions render: {REGENERATE}\n"
                    + "\n".join(list(diff)[:40]))


def test_every_setting_has_a_row_in_docs_settings_md():
    fields = {f"SAMSERVE_{name.upper()}" for name in BuildSettings.model_fields}
    fields |= {f"SAMSERVE_CLIENT_{name.upper()}" for name in ClientSettings.model_fields}
    fields |= {f"SAMSERVE_LABELSTUDIO_{name.upper()}" for name in LabelStudioSettings.model_fields}
    rows = re.findall(r"^\| `(SAMSERVE_[A-Z0-9_]+)`", settings_doc.render(), re.M)
    assert sorted(rows) == sorted(fields)  # each once, under the class that defines it


def test_a_setting_without_a_description_fails_the_rendering():
    class Undocumented(GatewaySettings):
        new_knob: int = Field(3)

    section = settings_doc.Section("Test", Undocumented, "tests", "tests", settings_doc.GATEWAY)
    with pytest.raises(settings_doc.UndocumentedSetting, match="Undocumented.new_knob has no description"):
        settings_doc.render_section(section)


def test_check_exits_1_with_the_command_when_the_file_differs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(settings_doc, "ROOT", tmp_path)
    monkeypatch.setattr(settings_doc, "DOC", tmp_path / "docs" / "settings.md")
    assert settings_doc.main(["--check"]) == 1  # missing
    assert REGENERATE in capsys.readouterr().err
    assert settings_doc.main([]) == 0
    assert settings_doc.main(["--check"]) == 0
    settings_doc.DOC.write_text(settings_doc.DOC.read_text() + "edited by hand\n")
    assert settings_doc.main(["--check"]) == 1
    assert REGENERATE in capsys.readouterr().err


def test_the_settings_and_the_generator_import_neither_torch_nor_triton():
    code = ("import sys, samserve_dev.settings_doc; "
            "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'tritonclient', 'segment_anything'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
