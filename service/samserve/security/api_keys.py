"""API keys, per call: the keys of the keys file (:mod:`samserve.security.key_file`), a call's bearer token matched
against their hashes, and whether the key's tenant may call the RPC.

:class:`KeyRing` re-reads the file when it changes (:mod:`samserve.security.watched_file`), so a key is added or
revoked without a restart; a file that does not parse then keeps the last good keys (logged as an error) -- at
start-up it stops the gateway instead.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from samserve.core.errors import Unauthenticated
from samserve.security.key_file import ApiKey, KeyFile, KeyFileError, hash_token, read_key_file
from samserve.security.policy import bearer_token, permit
from samserve.security.quotas import TenantLimits
from samserve.security.watched_file import WatchedFile

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    keys: dict[str, ApiKey]
    """Key id -> entry."""
    file: KeyFile


def _load(path: Path) -> _Loaded:
    file = read_key_file(path)
    return _Loaded({key.id: key for key in file.keys}, file)


class KeyRing:
    """The keys of a keys file, re-read when the file changes (:class:`samserve.security.watched_file.WatchedFile`: a
    broken or vanished file keeps the last good keys); :meth:`authorize` decides a call. Construction raises
    KeyFileError when the file cannot be used (the gateway does not start)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = WatchedFile(self.path, _load, "API keys file", KeyFileError)
        if not self.keys():
            LOG.warning("API keys file %s holds no keys: every call will be UNAUTHENTICATED", self.path)

    def limits(self, tenant: str) -> TenantLimits:
        """The quotas of ``tenant`` (its ``tenants`` entry, else ``default_limits``), from the current file."""
        file = self._file.current().file
        return file.tenants.get(tenant, file.default_limits)

    def keys(self) -> dict[str, ApiKey]:
        """The current keys by id (the file re-read first when it changed)."""
        return self._file.current().keys

    def authenticate(self, token: str) -> ApiKey:
        """The key whose hash matches ``token``; Unauthenticated otherwise (constant-time hash comparison)."""
        key_id, _, secret = token.partition(".")
        key = self.keys().get(key_id) if secret else None
        # Hash and compare even for an unknown id, so both paths cost the same.
        expected = key.sha256 if key is not None else "0" * 64
        if not hmac.compare_digest(hash_token(token), expected) or key is None:
            raise Unauthenticated("invalid API key")
        return key

    def authorize(self, method: str | None, metadata: Iterable[tuple[str, str | bytes]] | None) -> ApiKey:
        """The key a call to RPC ``method`` (a SegmentAnything method name; None: another service such as
        reflection, which any valid key may call) is made with. Unauthenticated: no, malformed or unknown
        credentials; PermissionDenied: the key's tenant may not call ``method``."""
        return permit(self.authenticate(bearer_token(metadata)), method)
