"""JWT bearer tokens verified against a JWKS file: an identity provider's public keys (e.g. a mounted ConfigMap,
refreshed by whoever rotates them; re-read on change by :class:`samserve.security.watched_file.WatchedFile`).

A token is accepted when its signature verifies with the JWKS key its header names (``kid``; a JWKS of one key
may omit it) using an asymmetric algorithm (RS*, PS*, ES*, EdDSA: never ``none``, never an HMAC secret), it has
not expired (``exp`` required, :data:`LEEWAY_S` of clock skew), its ``aud`` contains the configured audience and,
when an issuer is configured, its ``iss`` is that issuer. Its tenant is a claim (``tenant`` by default); the RPCs it
may call are its ``scope`` entries ``samserve:<RPC>`` (``samserve:*``: all).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jwt

from samserve.core.errors import Unauthenticated
from samserve.security.policy import ALL_METHODS, METHODS, TENANT_PATTERN
from samserve.security.watched_file import WatchedFile

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""Accepted signature algorithms: public-key ones only."""
LEEWAY_S = 30.0
"""Clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
SCOPE_PREFIX = "samserve:"


class JwksFileError(ValueError):
    """The JWKS file is missing, unreadable or holds no usable key (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class TokenCaller:
    """Who a verified JWT speaks for."""

    tenant: str
    methods: frozenset[str]
    subject: str

    def may_call(self, method: str) -> bool:
        return ALL_METHODS in self.methods or method in self.methods


def read_jwks(path: Path) -> dict[str | None, jwt.PyJWK]:
    """The signing keys of a JWKS file by ``kid`` (the key of a one-key set also under None)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        keys = jwt.PyJWKSet.from_dict(document).keys
    except (OSError, ValueError, jwt.PyJWKSetError, jwt.InvalidKeyError) as error:
        raise JwksFileError(f"JWKS file {path}: {error}") from error
    usable = {key.key_id: key for key in keys if key.public_key_use in (None, "sig")}
    if not usable:
        raise JwksFileError(f"JWKS file {path} holds no signing key")
    if len(usable) == 1:
        usable[None] = next(iter(usable.values()))
    return usable


class JwtVerifier:
    """Verifies JWTs against the keys of a JWKS file (see the module's docstring for what is checked)."""

    def __init__(self, jwks_file: Path, audience: str, issuer: str | None = None, tenant_claim: str = "tenant") -> None:
        self._jwks = WatchedFile(jwks_file, read_jwks, "JWKS file", JwksFileError)
        self.audience = audience
        self.issuer = issuer
        self.tenant_claim = tenant_claim

    def verify(self, token: str) -> TokenCaller:
        """The caller ``token`` speaks for; Unauthenticated (saying why) when it does not verify."""
        try:
            header = jwt.get_unverified_header(token)
            key = self._jwks.current().get(header.get("kid"))
            if key is None:
                raise Unauthenticated(f"invalid token: no key {header.get('kid')!r} in the JWKS")
            algorithms = [key.algorithm_name] if key.algorithm_name in ALGORITHMS else list(ALGORITHMS)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=algorithms, audience=self.audience, issuer=self.issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "aud"] + (["iss"] if self.issuer else [])},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"invalid token: {error}") from None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise Unauthenticated(f"invalid token: claim {self.tenant_claim!r} must name a tenant (1-64 letters, "
                                  "digits, '.', '_', '-')")
        scopes = str(claims.get("scope", "")).split()
        methods = frozenset(s.removeprefix(SCOPE_PREFIX) for s in scopes if s.startswith(SCOPE_PREFIX))
        return TokenCaller(tenant, methods & (METHODS | {ALL_METHODS}), str(claims.get("sub", "")))
