"""The security settings checked at start-up (load_security), the certificate files' reload decisions
(ServerCertificates.fetch), and the client channel's argument checks (what `samserve up` binds Triton and Redis to is in
tests/integration/test_server.py: its module imports the whole server).
Certificates are made by the openssl CLI (samserve_dev.certificates)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from samserve.core.settings import GatewaySettings
from samserve.security.key_file import add_key
from samserve.security.loader import SecurityConfigError, load_security
from samserve.security.tls import ServerCertificates, TlsConfigError, client_channel
from samserve_dev.certificates import OPENSSL, Certificate, issue, make_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certificate]:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root, "ca")
    return {"ca": ca, "one": issue(ca, root, "one"), "two": issue(ca, root, "two")}


def settings(**values: object) -> GatewaySettings:
    return GatewaySettings(**values)  # type: ignore[arg-type]


def test_auth_needs_a_keys_file_or_an_explicit_off(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SAMSERVE_AUTH", raising=False)
    monkeypatch.delenv("SAMSERVE_API_KEYS_FILE", raising=False)
    with pytest.raises(SecurityConfigError, match="SAMSERVE_API_KEYS_FILE is not set.*SAMSERVE_AUTH=off"):
        load_security(settings())
    with caplog.at_level(logging.WARNING):
        security = load_security(settings(auth="off"))
    assert security.credentials is None and security.certificates is None
    assert any(r.levelno == logging.WARNING and "authentication is OFF" in r.getMessage() for r in caplog.records)
    path = tmp_path / "keys.json"
    add_key(path, "acme")
    assert load_security(settings(api_keys_file=path)).credentials is not None
    with pytest.raises(SecurityConfigError, match="does not exist"):
        load_security(settings(api_keys_file=tmp_path / "absent.json"))


def test_plaintext_beyond_loopback_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        load_security(settings(auth="off", gateway_host="0.0.0.0"))
    assert any("plaintext" in r.getMessage() for r in caplog.records)


def test_tls_settings_are_checked(pki, tmp_path):
    one, two = pki["one"], pki["two"]
    assert load_security(settings(auth="off", tls_cert_file=one.cert, tls_key_file=one.key)).certificates
    with pytest.raises(SecurityConfigError, match="needs both"):
        load_security(settings(auth="off", tls_cert_file=one.cert))
    with pytest.raises(SecurityConfigError, match="needs SAMSERVE_TLS_CERT_FILE"):
        load_security(settings(auth="off", tls_client_ca_file=pki["ca"].cert))
    with pytest.raises(SecurityConfigError, match="does not exist"):
        load_security(settings(auth="off", tls_cert_file=tmp_path / "x.pem", tls_key_file=one.key))
    with pytest.raises(SecurityConfigError, match="with key"):  # a key of another certificate
        load_security(settings(auth="off", tls_cert_file=one.cert, tls_key_file=two.key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SecurityConfigError, match="client CA file"):
        load_security(settings(auth="off", tls_cert_file=one.cert, tls_key_file=one.key, tls_client_ca_file=garbage))
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([OPENSSL, "pkey", "-in", str(one.key), "-aes256", "-passout", "pass:secret", "-out",
                    str(encrypted)], check=True, capture_output=True, timeout=60)
    with pytest.raises(SecurityConfigError, match="encrypted"):
        load_security(settings(auth="off", tls_cert_file=one.cert, tls_key_file=encrypted))


def _replace(source: Path, target: Path) -> None:
    staged = target.with_suffix(".new")
    shutil.copy(source, staged)
    os.replace(staged, target)


def test_certificates_are_re_read_only_when_changed_and_usable(pki, tmp_path, caplog):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["one"].cert, cert)
    shutil.copy(pki["one"].key, key)
    files = ServerCertificates(cert, key)
    assert not files.mutual
    assert files.fetch() is None  # unchanged: gRPC keeps the current configuration
    _replace(pki["two"].cert, cert)  # half rotated: certificate and key disagree
    with caplog.at_level(logging.ERROR):
        assert files.fetch() is None and files.fetch() is None
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
    _replace(pki["two"].key, key)
    assert files.fetch() is not None  # both rotated: a new configuration for the next handshakes
    assert files.fetch() is None
    key.unlink()
    assert files.fetch() is None  # vanished: keep serving the loaded pair


def test_mutual_tls_needs_the_client_ca(pki):
    files = ServerCertificates(pki["one"].cert, pki["one"].key, pki["ca"].cert)
    assert files.mutual and files.credentials() is not None


def test_client_channel_checks_its_files(pki, tmp_path):
    with pytest.raises(TlsConfigError, match="cert_file and key_file"):
        client_channel("127.0.0.1:1", cert_file=pki["one"].cert)
    with pytest.raises(TlsConfigError, match="TLS CA file"):
        client_channel("127.0.0.1:1", ca_file=tmp_path / "absent.pem")
    client_channel("127.0.0.1:1", ca_file=pki["ca"].cert, token="sk-0.x").close()
