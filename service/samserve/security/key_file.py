"""The API keys file (a JSON document, e.g. a mounted Secret) and its administration: tokens made, keys added and
revoked, tenants' limits set (the ``samserve keys`` commands). The per-call check is :mod:`samserve.security.api_keys`.

A token is ``<key id>.<secret>``: the id (``sk-`` and 12 hex digits) is public and names the entry; the secret is
32 random bytes from :mod:`secrets` (base64url). The file holds, per key, the id, the tenant, the RPCs it may call
and the SHA-256 of the whole token, never the token::

    {"keys": [{"id": "sk-0f3a9c21b4d7", "tenant": "acme", "methods": ["Embed", "Segment"],
               "sha256": "9b1f...64 hex digits", "created": "2026-11-27T17:00:00Z"}]}

``methods`` lists RPC names of ``samserve.v1.SegmentAnything`` or is ``["*"]`` (all of them). Optional quotas
(:mod:`samserve.security.quotas`), per tenant, with defaults for tenants not listed::

    "tenants": {"acme": {"requests_per_s": 50, "encodes_per_min": 120, "decoder_prompts_per_min": 200000}},
    "default_limits": {"requests_per_s": 10, "encodes_per_min": 20}

Why SHA-256 and not a salted slow hash (scrypt, PBKDF2): those protect *guessable* secrets (passwords) from
offline guessing; a token carries 256 random bits, out of reach of any guessing with or without salt. A slow hash
would instead cost every RPC milliseconds of CPU. The stored hash is compared with :func:`hmac.compare_digest`
(constant time) after the entry is found by its public id.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from samserve.security.policy import ALL_METHODS, METHODS, TENANT_PATTERN
from samserve.security.quotas import TenantLimits

_KEY_ID = re.compile(r"sk-[0-9a-f]{12}")


class KeyFileError(ValueError):
    """The keys file is missing, unreadable or not in the documented format (the message names the file)."""


class ApiKey(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="public key id, the token's prefix: sk- and 12 hex digits")
    tenant: str = Field(description="who the key belongs to: letters, digits, '.', '_', '-' (at most 64)")
    methods: tuple[str, ...] = Field(description="RPC names it may call, or ['*']")
    sha256: str = Field(description="SHA-256 of the whole token, 64 lowercase hex digits")
    created: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _KEY_ID.fullmatch(value):
            raise ValueError(f"must be 'sk-' and 12 hex digits, got {value!r}")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not TENANT_PATTERN.fullmatch(value):
            raise ValueError(f"must be 1-64 letters, digits, '.', '_' or '-', got {value!r}")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one RPC (or '*')")
        unknown = set(value) - METHODS - {ALL_METHODS}
        if unknown:
            raise ValueError(f"unknown RPC(s) {sorted(unknown)}; known: {sorted(METHODS)} or '*'")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits (the SHA-256 of the token; never the token)")
        return value

    def may_call(self, method: str) -> bool:
        return ALL_METHODS in self.methods or method in self.methods


class KeyFile(BaseModel):
    """The keys file: ``{"keys": [ApiKey, ...], "tenants": {name: TenantLimits}, "default_limits": TenantLimits}``;
    key ids and hashes are unique."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict, description="quotas of the tenants named")
    default_limits: TenantLimits = Field(default_factory=TenantLimits, description="quotas of any other tenant")

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantLimits]) -> dict[str, TenantLimits]:
        for name in value:
            ApiKey._tenant(name)
        return value

    @field_validator("keys")
    @classmethod
    def _unique(cls, value: list[ApiKey]) -> list[ApiKey]:
        for field in ("id", "sha256"):
            seen = [getattr(key, field) for key in value]
            duplicates = sorted({item for item in seen if seen.count(item) > 1})
            if duplicates:
                raise ValueError(f"duplicate {field}: {duplicates}")
        return value


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token (what the keys file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh (key id, token)."""
    key_id = f"sk-{secrets.token_hex(6)}"
    return key_id, f"{key_id}.{secrets.token_urlsafe(32)}"


def read_key_file(path: Path) -> KeyFile:
    """Parse and validate the keys file; KeyFileError names the file and what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise KeyFileError(f"API keys file {path}: cannot read it ({error.strerror or error})") from error
    try:
        return KeyFile.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise KeyFileError(f"API keys file {path}: not JSON ({error})") from error
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                             for e in error.errors())
        raise KeyFileError(f"API keys file {path}: {problems}") from error


def write_key_file(path: Path, keys: KeyFile) -> None:
    """Replace the file atomically (a reader sees the old or the new version, never half of one), mode 0600."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(keys.model_dump_json(indent=2, exclude_defaults=True) + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_key(path: Path, tenant: str, methods: Sequence[str] = (ALL_METHODS,)) -> tuple[ApiKey, str]:
    """Add a new key for ``tenant`` to the file (created if absent): (its entry, the token, shown only now)."""
    path = Path(path)
    keys = read_key_file(path) if path.exists() else KeyFile()
    key_id, token = new_token()
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        entry = ApiKey(id=key_id, tenant=tenant, methods=tuple(methods), sha256=hash_token(token), created=created)
    except ValidationError as error:
        raise KeyFileError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())) from error
    write_key_file(path, keys.model_copy(update={"keys": [*keys.keys, entry]}))
    return entry, token


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Remove the key ``key_id`` from the file: the removed entry (KeyError when there is none)."""
    keys = read_key_file(path)
    kept = [key for key in keys.keys if key.id != key_id]
    if len(kept) == len(keys.keys):
        raise KeyError(key_id)
    write_key_file(path, keys.model_copy(update={"keys": kept}))
    return next(key for key in keys.keys if key.id == key_id)


def set_limits(path: Path, tenant: str | None, limits: TenantLimits) -> KeyFile:
    """Set the quotas of ``tenant`` (None: ``default_limits``) in the file; empty limits remove a tenant's entry
    (it falls back to the defaults). Returns the file as written."""
    keys = read_key_file(path)
    if tenant is None:
        updated = keys.model_copy(update={"default_limits": limits})
    else:
        tenants = {name: value for name, value in keys.tenants.items() if name != tenant}
        if limits != TenantLimits():
            tenants[tenant] = limits
        try:
            updated = KeyFile.model_validate({**keys.model_dump(), "tenants": tenants})
        except ValidationError as error:
            raise KeyFileError("; ".join(e["msg"] for e in error.errors())) from error
    write_key_file(path, updated)
    return updated
