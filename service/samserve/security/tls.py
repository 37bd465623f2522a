"""TLS for the gateway's gRPC and HTTP ports (server side, certificate files re-read when they change) and the
client side (channels with TLS, mutual TLS and a bearer token).

Server: :class:`ServerCertificates` holds the PEM files (certificate chain, private key, and for mutual TLS the CA
that signs client certificates). gRPC asks it for the configuration before every TLS handshake
(``grpc.dynamic_ssl_server_credentials``); it answers "unchanged" after one ``stat`` per file, and re-reads the files
when one changed (a rotated Kubernetes Secret, ``cert-manager``): new connections get the new certificate, open
connections keep theirs, nothing restarts. A changed set that does not load (a key that does not match the
certificate, a file half written) keeps the last good one and logs an error once.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from samserve.core import service_config

LOG = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A certificate, key or CA file is missing, unreadable, not PEM, or the key does not match the certificate."""


def _no_password() -> bytes:
    raise TlsConfigError("the private key is encrypted: give the gateway an unencrypted PEM key (a Secret)")


def _check_pair(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
    """Load the files with the ssl module: PEM syntax, key matching the certificate, CA certificates parse."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except TlsConfigError:
        raise
    except (ssl.SSLError, OSError) as error:
        raise TlsConfigError(f"TLS certificate {cert_file} with key {key_file}: {error}") from error
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as error:
            raise TlsConfigError(f"TLS client CA file {client_ca_file}: {error}") from error


class ServerCertificates:
    """The gateway's certificate files, validated at construction (TlsConfigError) and re-read when they change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        for path in self.files:
            if not path.is_file():
                raise TlsConfigError(f"TLS file {path} does not exist (or is not a file)")
        self._signature = self._stat()
        self.initial = self._load()
        self._failed: tuple[tuple[int, int, int, int], ...] | None = None
        """The files' signature when they last failed to load (logged once)."""

    @property
    def files(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    @property
    def mutual(self) -> bool:
        """Client certificates are required and verified against :attr:`client_ca_file`."""
        return self.client_ca_file is not None

    def _stat(self) -> tuple[tuple[int, int, int, int], ...]:
        """(inode, device, size, mtime in ns) per file: follows symlinks, so a Secret's ``..data`` swap counts."""
        stats = [os.stat(path) for path in self.files]
        return tuple((s.st_ino, s.st_dev, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """Read the files and check them; TlsConfigError when they do not make a usable set."""
        try:
            chain, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
            roots = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        except OSError as error:
            raise TlsConfigError(f"TLS file {error.filename}: {error.strerror}") from error
        _check_pair(self.cert_file, self.key_file, self.client_ca_file)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake question: a new configuration when the files changed, None to keep the current."""
        signature = None
        try:
            signature = self._stat()
            if signature in (self._signature, self._failed):
                return None
            configuration = self._load()
            if self._stat() != signature:  # changed while being read: take it at a later handshake
                return None
        except (OSError, TlsConfigError) as error:
            if signature != self._failed:
                LOG.error("TLS files changed but cannot be used (keeping the certificate loaded before): %s", error)
            self._failed = signature
            return None
        self._signature, self._failed = signature, None
        LOG.info("TLS certificate files re-read (%s)", ", ".join(str(path) for path in self.files))
        return configuration

    def _ssl_context(self) -> ssl.SSLContext:
        """A server-side SSLContext of the files as they are now (client certificates required with a client CA)."""
        _check_pair(self.cert_file, self.key_file, self.client_ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificates for an ``ssl``-based server (the HTTP port), rotated the same way: at every
        handshake (its ClientHello callback) one ``stat`` per file; when they changed and load, new connections
        switch to a context of the new files; when they do not load, the last good one stays (logged once)."""
        initial = self._ssl_context()
        signature, current = self._stat(), initial

        def on_client_hello(connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            nonlocal signature, current
            try:
                now = self._stat()
                if now != signature:
                    signature = now  # tried once per change, good or bad
                    current = self._ssl_context()
                    LOG.info("TLS certificate files re-read for the HTTP port")
            except (OSError, ssl.SSLError, TlsConfigError) as error:
                LOG.error("TLS files changed but cannot be used on the HTTP port (keeping the certificate loaded "
                          "before): %s", error)
            if connection.context is not current:
                connection.context = current

        initial.sni_callback = on_client_hello
        return initial

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files when they change; with a client CA, client certificates are
        required and verified (mutual TLS)."""
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch, self.mutual)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsConfigError(f"{what} {path}: {error.strerror}") from error


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata (unary calls, and Interact sessions)."""

    def __init__(self, token: str) -> None:
        self.entry = ("authorization", f"Bearer {token}")

    def _with_token(self, client_call_details: Any) -> Any:
        return client_call_details._replace(metadata=[*(client_call_details.metadata or ()), self.entry])

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


def client_channel(
    target: str,
    *,
    token: str | None = None,
    tls: bool = False,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str | None = None,
    retry_attempts: int = service_config.DEFAULT_ATTEMPTS,
    keepalive_s: float = service_config.KEEPALIVE_S,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A blocking channel to the gateway. TLS when ``tls`` or any file is given: ``ca_file`` the CA that signed the
    gateway's certificate (else the system's roots), ``cert_file``/``key_file`` this client's certificate for
    mutual TLS, ``server_name`` the name to check the certificate against instead of the target's host. ``token``
    is sent as ``authorization: Bearer <token>`` on every call. ``target``: one address, or several separated by
    commas (round robin); calls ending UNAVAILABLE are retried up to ``retry_attempts`` attempts in all (see
    :mod:`samserve.core.service_config`); while calls are in flight it pings every ``keepalive_s`` to notice a gateway
    that vanished."""
    options = [("grpc.service_config", service_config.service_config(retry_attempts)),
               *service_config.client_keepalive_options(keepalive_s), *(options or [])]
    target = service_config.channel_target(target)
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("a client certificate needs its key and the other way round (cert_file and key_file)")
    if tls or ca_file or cert_file:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file, "TLS CA file"), private_key=_read(key_file, "TLS client key"),
            certificate_chain=_read(cert_file, "TLS client certificate"),
        )
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
