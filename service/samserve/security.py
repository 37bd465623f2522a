"""What the gateway's security settings resolve to (README "Security"): TLS certificates and API keys, checked
before anything starts."""

from __future__ import annotations

import dataclasses
import logging

from samserve.api_keys import KeyFileError, KeyRing
from samserve.settings import AuthMode, GatewaySettings
from samserve.tls import ServerCertificates, TlsConfigError

LOG = logging.getLogger(__name__)


class SecurityConfigError(ValueError):
    """The security settings do not make a usable gateway (the message says which setting and why)."""


@dataclasses.dataclass(frozen=True)
class Security:
    """What the security settings resolve to: TLS certificates (None: plaintext) and API keys (None: auth off)."""

    certificates: ServerCertificates | None
    keys: KeyRing | None


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
    keys = None
    if settings.auth is AuthMode.API_KEYS:
        if settings.api_keys_file is None:
            raise SecurityConfigError(
                "SAMSERVE_API_KEYS_FILE is not set: give the gateway a keys file (`samserve keys add`), or set "
                "SAMSERVE_AUTH=off to let anyone who reaches the port call it")
        try:
            keys = KeyRing(settings.api_keys_file)
        except KeyFileError as error:
            raise SecurityConfigError(str(error)) from error
    elif settings.api_keys_file is not None:
        LOG.warning("SAMSERVE_API_KEYS_FILE is set but SAMSERVE_AUTH=off: the keys are not checked")
    if keys is None:
        LOG.warning("authentication is OFF (SAMSERVE_AUTH=off): anyone who reaches %s may call every RPC",
                    settings.gateway_target)
    if certificates is None and settings.gateway_host not in _LOOPBACK:
        LOG.warning("the gateway serves plaintext gRPC on %s (no SAMSERVE_TLS_CERT_FILE): credentials and images "
                    "travel in clear", settings.gateway_target)
    return Security(certificates, keys)
