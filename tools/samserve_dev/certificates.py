"""Throw-away X.509 certificates for TLS tests, made with the ``openssl`` command line (EC P-256, valid 2 days),
and what a TLS server presents on a port."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
from pathlib import Path

OPENSSL = "/usr/bin/openssl"
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A PEM certificate and its unencrypted PEM key."""

    cert: Path
    key: Path

    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


def make_ca(folder: Path, name: str) -> Certificate:
    """A self-signed CA ``CN=<name>`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", *_EC_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=folder)
    return Certificate(cert, key)


def issue(ca: Certificate, folder: Path, name: str, server: bool = True) -> Certificate:
    """A certificate ``CN=<name>`` signed by ``ca``: a server one for 127.0.0.1 and localhost, or a client one."""
    cert, key, request, extensions = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr",
                                      folder / f"{name}.ext")
    _openssl("req", *_EC_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={name}", cwd=folder)
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" if server
                          else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", extensions, cwd=folder)
    return Certificate(cert, key)


def presented_certificate(host: str, port: int, timeout_s: float = 5.0) -> bytes:
    """The DER certificate a TLS server on ``host:port`` presents to a new connection (not verified; HTTP/2
    offered, as gRPC clients do)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout_s) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
