"""What the gateway's security settings resolve to (docs/security.md): TLS certificates, API keys and the
credentials for Redis, checked before anything starts."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from samserve.core.settings import AuthMode, GatewaySettings
from samserve.security.api_keys import KeyFileError, KeyRing
from samserve.security.credentials import Credentials
from samserve.security.jwt import JwksFileError, JwtVerifier
from samserve.security.tls import ServerCertificates, TlsConfigError

LOG = logging.getLogger(__name__)


class SecurityConfigError(ValueError):
    """The security settings do not make a usable gateway (the message says which setting and why)."""


@dataclasses.dataclass(frozen=True)
class Security:
    """What the security settings resolve to: TLS certificates (None: plaintext) and credentials (None: auth
    off)."""

    certificates: ServerCertificates | None
    credentials: Credentials | None
    redis_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of redis-py's ``from_url``: password (AUTH) and the ``ssl_*`` files of ``rediss://``."""


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def load_security(settings: GatewaySettings) -> Security:
    """Check the security settings and read their files; SecurityConfigError says what is wrong. Logs a WARNING
    when auth is off, and when the gateway serves plaintext beyond loopback."""
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SecurityConfigError("TLS needs both SAMSERVE_TLS_CERT_FILE and SAMSERVE_TLS_KEY_FILE")
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        raise SecurityConfigError("SAMSERVE_TLS_CLIENT_CA_FILE (mutual TLS) needs SAMSERVE_TLS_CERT_FILE and _KEY_FILE")
    certificates = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            certificates = ServerCertificates(settings.tls_cert_file, settings.tls_key_file,
                                              settings.tls_client_ca_file)
        except TlsConfigError as error:
            raise SecurityConfigError(str(error)) from error
    credentials = None
    if settings.auth is AuthMode.API_KEYS:
        if settings.api_keys_file is None and settings.jwt_jwks_file is None:
            raise SecurityConfigError(
                "SAMSERVE_API_KEYS_FILE is not set: give the gateway a keys file (`samserve keys add`) or a JWKS "
                "file (SAMSERVE_JWT_JWKS_FILE), or set SAMSERVE_AUTH=off to let anyone who reaches the port call it")
        try:
            keys = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
            tokens = None if settings.jwt_jwks_file is None else JwtVerifier(
                settings.jwt_jwks_file, settings.jwt_audience, settings.jwt_issuer, settings.jwt_tenant_claim)
        except (KeyFileError, JwksFileError) as error:
            raise SecurityConfigError(str(error)) from error
        credentials = Credentials(keys, tokens)
    elif settings.api_keys_file is not None or settings.jwt_jwks_file is not None:
        LOG.warning("SAMSERVE_API_KEYS_FILE or SAMSERVE_JWT_JWKS_FILE is set but SAMSERVE_AUTH=off: no credentials "
                    "are checked")
    if credentials is None:
        LOG.warning("authentication is OFF (SAMSERVE_AUTH=off): anyone who reaches %s may call every RPC",
                    settings.gateway_target)
    if certificates is None and settings.gateway_host not in _LOOPBACK:
        LOG.warning("the gateway serves plaintext gRPC on %s (no SAMSERVE_TLS_CERT_FILE): credentials and images "
                    "travel in clear", settings.gateway_target)
    return Security(certificates, credentials, redis_options(settings))


def _readable(path: Path, setting: str) -> Path:
    try:
        with open(path, "rb"):
            return path
    except OSError as error:
        raise SecurityConfigError(f"{setting} {path}: {error.strerror or error}") from error


def redis_options(settings: GatewaySettings) -> dict[str, Any]:
    """redis-py options for Redis AUTH and TLS; SecurityConfigError when a file is unreadable or TLS files are
    given for a ``redis://`` (plaintext) URL."""
    options: dict[str, Any] = {}
    if settings.redis_password_file is not None:
        path = _readable(settings.redis_password_file, "SAMSERVE_REDIS_PASSWORD_FILE")
        options["password"] = path.read_text(encoding="utf-8").rstrip("\r\n")
    tls = {"ssl_ca_certs": ("SAMSERVE_REDIS_TLS_CA_FILE", settings.redis_tls_ca_file),
           "ssl_certfile": ("SAMSERVE_REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file),
           "ssl_keyfile": ("SAMSERVE_REDIS_TLS_KEY_FILE", settings.redis_tls_key_file)}
    given = {option: (setting, path) for option, (setting, path) in tls.items() if path is not None}
    if given and not (settings.redis_url or "").startswith("rediss://"):
        raise SecurityConfigError(f"{', '.join(setting for setting, _ in given.values())} need a rediss:// "
                                  "SAMSERVE_REDIS_URL (TLS to Redis)")
    if (settings.redis_tls_cert_file is None) != (settings.redis_tls_key_file is None):
        raise SecurityConfigError("SAMSERVE_REDIS_TLS_CERT_FILE and SAMSERVE_REDIS_TLS_KEY_FILE go together")
    options.update({option: str(_readable(path, setting)) for option, (setting, path) in given.items()})
    if settings.redis_url and settings.redis_url.startswith("redis://") and settings.redis_password_file is not None \
            and settings.gateway_host not in _LOOPBACK:
        LOG.warning("the Redis password travels in clear (redis://): use rediss:// beyond a private network")
    return options
