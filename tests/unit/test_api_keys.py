"""The API keys file (format, hashing, verification, reload, revocation, errors) and the auth interceptor's
decision table (who may call what; health open; refusals mapped by the one status table)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from samserve.core.api import SERVICE_NAME
from samserve.core.errors import PermissionDenied, Unauthenticated
from samserve.security import policy
from samserve.security.api_keys import KeyRing
from samserve.security.credentials import Credentials
from samserve.security.key_file import KeyFileError, add_key, hash_token, read_key_file, revoke_key
from samserve.transport.call_context import RequestIdLogFilter, request_id, tenant
from samserve.transport.interceptors import AuthInterceptor, QuotaInterceptor, interceptors
from samserve.transport.status import status_code


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def ring(tmp_path: Path) -> tuple[KeyRing, dict[str, str]]:
    """Tenants ``all`` (every RPC) and ``seg`` (Segment only) in a fresh file: the ring and tokens by tenant."""
    path = tmp_path / "keys.json"
    tokens = {"all": add_key(path, "all")[1], "seg": add_key(path, "seg", ["Segment"])[1]}
    return KeyRing(path), tokens


def test_the_file_holds_hashes_never_tokens(tmp_path):
    path = tmp_path / "keys.json"
    entry, token = add_key(path, "acme", ["Embed", "Segment"])
    text = path.read_text()
    assert token not in text and token.partition(".")[2] not in text
    stored = json.loads(text)["keys"][0]
    assert stored["sha256"] == hash_token(token) == entry.sha256 and len(stored["sha256"]) == 64
    assert stored["id"] == token.partition(".")[0] == entry.id and stored["tenant"] == "acme"
    assert stored["methods"] == ["Embed", "Segment"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [key.id for key in read_key_file(path).keys] == [entry.id]
    second, other = add_key(path, "acme")
    assert other != token and second.id != entry.id and len(read_key_file(path).keys) == 2


def test_the_methods_are_the_services_rpcs():
    assert policy.METHODS == {"Embed", "Segment", "GenerateMasks", "GetEmbedding", "GetModel", "GetDecoder", "Interact"}


def test_a_valid_token_names_its_tenant(ring):
    keys, tokens = ring
    assert keys.authorize("Embed", bearer(tokens["all"])).tenant == "all"
    assert keys.authorize("GenerateMasks", bearer(tokens["all"])).tenant == "all"
    assert keys.authorize("Segment", bearer(tokens["seg"])).tenant == "seg"
    assert keys.authorize(None, bearer(tokens["seg"])).tenant == "seg"  # another service (reflection)
    assert keys.authorize("Segment", (("Authorization", f"bearer  {tokens['seg']}"),)).tenant == "seg"
    assert keys.authorize("Segment", (("authorization", f"Bearer {tokens['seg']}".encode()),)).tenant == "seg"


@pytest.mark.parametrize("metadata, message", [
    ((), "missing credentials"),
    ((("x-request-id", "abc"),), "missing credentials"),
    ((("authorization", "Basic dXNlcjpwYXNz"),), "malformed"),
    ((("authorization", "Bearer"),), "malformed"),
    ((("authorization", "Bearer a b"),), "malformed"),
    ((("authorization", "Bearer sk-000000000000.nope"),), "invalid API key"),
    ((("authorization", "Bearer not-even-an-id"),), "invalid API key"),
])
def test_missing_or_bad_credentials_are_unauthenticated(ring, metadata, message):
    keys, _ = ring
    with pytest.raises(Unauthenticated, match=message):
        keys.authorize("Segment", metadata)


def test_a_changed_secret_or_a_bare_id_is_unauthenticated(ring):
    keys, tokens = ring
    key_id, _, secret = tokens["all"].partition(".")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for token in (f"{key_id}.{flipped}", key_id, f"{key_id}.", tokens["seg"].partition(".")[0] + "." + secret):
        with pytest.raises(Unauthenticated, match="invalid API key"):
            keys.authorize("Segment", bearer(token))


def test_two_authorization_entries_are_refused(ring):
    keys, tokens = ring
    with pytest.raises(Unauthenticated, match="malformed"):
        keys.authorize("Segment", bearer(tokens["all"]) + bearer(tokens["seg"]))


@pytest.mark.parametrize("method", ["Embed", "GenerateMasks"])
def test_a_tenant_outside_its_rpcs_is_denied(ring, method):
    keys, tokens = ring
    with pytest.raises(PermissionDenied, match=f"'seg' may not call {method}"):
        keys.authorize(method, bearer(tokens["seg"]))


def test_keys_are_added_and_revoked_without_a_restart(ring, tmp_path):
    keys, tokens = ring
    path = keys.path
    keys.authorize("Embed", bearer(tokens["all"]))
    _, late = add_key(path, "late")
    assert keys.authorize("Embed", bearer(late)).tenant == "late"  # re-read at the next call
    revoke_key(path, tokens["all"].partition(".")[0])
    with pytest.raises(Unauthenticated):
        keys.authorize("Embed", bearer(tokens["all"]))
    assert keys.authorize("Segment", bearer(tokens["seg"])).tenant == "seg"
    with pytest.raises(KeyError):
        revoke_key(path, tokens["all"].partition(".")[0])


def test_an_in_place_edit_of_the_same_size_is_seen(ring):
    """An editor that rewrites the file in place (same inode, same length): the modification time tells."""
    keys, tokens = ring
    path = keys.path
    text = path.read_text()
    renamed = text.replace('"tenant": "seg"', '"tenant": "sag"')
    assert len(renamed) == len(text)
    stat = path.stat()
    path.write_text(renamed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later mtime, whatever the clock grain
    assert keys.authorize("Segment", bearer(tokens["seg"])).tenant == "sag"


def test_a_broken_file_keeps_the_last_good_keys(ring, caplog):
    keys, tokens = ring
    path = keys.path
    path.write_text("{not json")
    with caplog.at_level("ERROR"):
        assert keys.authorize("Embed", bearer(tokens["all"])).tenant == "all"
        assert keys.authorize("Embed", bearer(tokens["all"])).tenant == "all"
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1  # once per version
    path.unlink()
    assert keys.authorize("Embed", bearer(tokens["all"])).tenant == "all"
    _, fresh = add_key(path, "fresh")  # a good file again: read, and only its keys count
    assert keys.authorize("Embed", bearer(fresh)).tenant == "fresh"
    with pytest.raises(Unauthenticated):
        keys.authorize("Embed", bearer(tokens["all"]))


GOOD = {"id": "sk-0123456789ab", "tenant": "t", "methods": ["*"], "sha256": "a" * 64}


@pytest.mark.parametrize("document, message", [
    ("[]", "(top level)"),
    ('{"keys": [], "extra": 1}', "extra"),
    ("{bad", "not JSON"),
    (json.dumps({"keys": [{**GOOD, "sha256": "a" * 63}]}), "keys.0.sha256"),
    (json.dumps({"keys": [{**GOOD, "sha256": "A" * 64}]}), "keys.0.sha256"),
    (json.dumps({"keys": [{**GOOD, "id": "key-1"}]}), "keys.0.id"),
    (json.dumps({"keys": [{**GOOD, "tenant": ""}]}), "keys.0.tenant"),
    (json.dumps({"keys": [{**GOOD, "tenant": "a b"}]}), "keys.0.tenant"),
    (json.dumps({"keys": [{**GOOD, "methods": []}]}), "keys.0.methods"),
    (json.dumps({"keys": [{**GOOD, "methods": ["Embed", "Delete"]}]}), "Delete"),
    (json.dumps({"keys": [{**GOOD, "token": "clear"}]}), "keys.0.token"),
    (json.dumps({"keys": [{k: v for k, v in GOOD.items() if k != "sha256"}]}), "keys.0.sha256"),
    (json.dumps({"keys": [GOOD, {**GOOD, "sha256": "b" * 64}]}), "duplicate id"),
    (json.dumps({"keys": [GOOD, {**GOOD, "id": "sk-0123456789ac"}]}), "duplicate sha256"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, document, message):
    path = tmp_path / "keys.json"
    path.write_text(document)
    with pytest.raises(KeyFileError, match=str(path)) as caught:
        KeyRing(path)
    assert message in str(caught.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyRing(tmp_path / "absent.json")


def test_refusals_map_to_their_status_codes():
    assert status_code(Unauthenticated("x")) is grpc.StatusCode.UNAUTHENTICATED
    assert status_code(PermissionDenied("x")) is grpc.StatusCode.PERMISSION_DENIED


# The interceptor itself: what it returns for each kind of call.

def _unary_handler(answer: object) -> grpc.RpcMethodHandler:
    async def behavior(request, context):
        return (answer, request, tenant.get())

    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=lambda data: ("parsed", data),
                                               response_serializer=bytes)


def _decide(keys: KeyRing, method: str, metadata, handler: grpc.RpcMethodHandler | None = None):
    """Run the interceptor on one call: the handler it returns (``handler`` stands for the service's)."""
    handler = handler or _unary_handler("served")
    details = SimpleNamespace(method=method, invocation_metadata=metadata)

    async def continuation(_details):
        return handler

    return asyncio.run(AuthInterceptor(Credentials(keys, None)).intercept_service(continuation, details))


def _call(handler: grpc.RpcMethodHandler) -> object:
    async def run():
        request = handler.request_deserializer(b"payload") if handler.request_deserializer else b"payload"
        return await handler.unary_unary(request, None)

    return asyncio.run(run())


def test_the_interceptor_serves_a_permitted_call_as_its_tenant(ring):
    keys, tokens = ring
    handler = _decide(keys, f"/{SERVICE_NAME}/Segment", bearer(tokens["seg"]))
    assert _call(handler) == ("served", ("parsed", b"payload"), "seg")


@pytest.mark.parametrize("who, method, refusal", [
    (None, "Segment", Unauthenticated),
    ("bad", "Segment", Unauthenticated),
    ("seg", "Embed", PermissionDenied),
    ("seg", "GenerateMasks", PermissionDenied),
])
def test_the_interceptor_refuses_without_parsing_the_request(ring, who, method, refusal):
    keys, tokens = ring
    metadata = () if who is None else bearer(tokens.get(who, "sk-000000000000.x"))
    handler = _decide(keys, f"/{SERVICE_NAME}/{method}", metadata)
    assert handler.request_deserializer is None  # the payload stays bytes: a refused caller costs no parsing
    with pytest.raises(refusal):
        _call(handler)


def test_health_is_open_and_other_services_need_a_key(ring):
    keys, tokens = ring
    health = _unary_handler("healthy")
    assert _decide(keys, "/grpc.health.v1.Health/Check", (), health) is health
    stream = grpc.stream_stream_rpc_method_handler(lambda requests, context: iter(()))
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert _decide(keys, reflection, bearer(tokens["seg"]), stream) is stream
    refused = _decide(keys, reflection, (), stream)
    assert refused is not stream and refused.request_streaming and refused.response_streaming

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code, message):
            raise Aborted(code, message)

    with pytest.raises(Aborted) as caught:
        asyncio.run(refused.stream_stream(iter(()), Context()))
    assert caught.value.args[0] is grpc.StatusCode.UNAUTHENTICATED


def test_auth_and_quotas_are_in_the_chain_only_when_on(ring):
    keys, _ = ring
    assert not any(isinstance(i, (AuthInterceptor, QuotaInterceptor)) for i in interceptors())
    # innermost, quotas inside auth (they need the tenant): refusals are mapped and counted
    assert [type(i) for i in interceptors(Credentials(keys, None))[-2:]] == [AuthInterceptor, QuotaInterceptor]


def test_log_records_carry_the_request_and_the_tenant():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RequestIdLogFilter().filter(record) and (record.request_id, record.tenant) == ("-", "-")
    tokens = request_id.set("r1"), tenant.set("acme")
    try:
        RequestIdLogFilter().filter(record)
    finally:
        tenant.reset(tokens[1])
        request_id.reset(tokens[0])
    assert (record.request_id, record.tenant) == ("r1", "acme")
