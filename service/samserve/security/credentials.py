"""Who is calling: the bearer token of a call, checked as an API key (:mod:`samserve.security.api_keys`) or as a JWT
(:mod:`samserve.security.jwt`), and whether its tenant may call the RPC.

An API key is ``sk-<id>.<secret>`` (one dot); a JWT is three dot-separated parts. A gateway takes either or both,
as configured (``SAMSERVE_API_KEYS_FILE``, ``SAMSERVE_JWT_JWKS_FILE``); quotas come from the keys file for every
tenant, however it authenticated.
"""

from __future__ import annotations

from collections.abc import Iterable

from samserve.core.errors import Unauthenticated
from samserve.security.api_keys import KeyRing
from samserve.security.jwt import JwtVerifier
from samserve.security.policy import Caller, bearer_token, permit
from samserve.security.quotas import TenantLimits


class Credentials:
    """The gateway's ways to authenticate (at least one of them); :meth:`authorize` decides a call."""

    def __init__(self, keys: KeyRing | None, tokens: JwtVerifier | None) -> None:
        assert keys is not None or tokens is not None
        self.keys = keys
        self.tokens = tokens

    def authorize(self, method: str | None, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller of RPC ``method``: Unauthenticated for missing, malformed or invalid credentials,
        PermissionDenied when its tenant may not call ``method``."""
        token = bearer_token(metadata)
        caller: Caller
        if token.count(".") == 2 and self.tokens is not None:
            caller = self.tokens.verify(token)
        elif self.keys is not None:
            caller = self.keys.authenticate(token)
        else:
            raise Unauthenticated("invalid token: this gateway takes JWTs only")
        return permit(caller, method)

    def limits(self, tenant: str) -> TenantLimits:
        """The quotas of ``tenant`` (none without a keys file)."""
        return self.keys.limits(tenant) if self.keys is not None else TenantLimits()
