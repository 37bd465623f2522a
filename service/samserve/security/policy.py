"""What every way of authenticating shares: the RPC names a caller may be granted, the tenant name pattern, the
bearer token of a call's metadata, and the decision whether a caller may call an RPC. API keys
(:mod:`samserve.security.api_keys`) and JWTs (:mod:`samserve.security.jwt`) build on it; it builds on neither."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, TypeVar

from samserve.core.api import METHOD_NAMES
from samserve.core.errors import PermissionDenied, Unauthenticated

ALL_METHODS = "*"
METHODS: frozenset[str] = frozenset(METHOD_NAMES)
"""The RPC names of ``samserve.v1.SegmentAnything`` a key may be granted (Embed, Segment, GenerateMasks)."""
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BEARER = re.compile(r"bearer +(\S+)", re.IGNORECASE)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the ``authorization: Bearer <token>`` metadata entry; Unauthenticated when absent or
    malformed."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise Unauthenticated("missing credentials: send the metadata 'authorization: Bearer <API key>'")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    found = _BEARER.fullmatch(value.strip())
    if len(values) > 1 or found is None:
        raise Unauthenticated("malformed credentials: expected one 'authorization: Bearer <API key>'")
    return found.group(1)


class Caller(Protocol):
    """An authenticated caller: an API key's entry or a verified token."""

    @property
    def tenant(self) -> str: ...

    def may_call(self, method: str) -> bool: ...


C = TypeVar("C", bound=Caller)


def permit(caller: C, method: str | None) -> C:
    """``caller`` when it may call RPC ``method`` (None: another service such as reflection, open to any caller);
    PermissionDenied naming the tenant otherwise."""
    if method is None or caller.may_call(method):
        return caller
    raise PermissionDenied(f"tenant {caller.tenant!r} may not call {method}")
