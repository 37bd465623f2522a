"""JWTs verified against a JWKS file: what is accepted (signature by the named key, audience, issuer, expiry with
leeway, the tenant claim, scopes as RPCs), what is refused and why (the algorithm-confusion and ``none`` tricks
included), key rotation by replacing the file, and how a bearer token is routed between API keys and JWTs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from samserve.core.errors import PermissionDenied, Unauthenticated
from samserve.security.api_keys import KeyRing
from samserve.security.credentials import Credentials
from samserve.security.jwt import JwksFileError, JwtVerifier
from samserve.security.key_file import add_key
from samserve_dev.jwts import new_key, token, write_jwks


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


@pytest.fixture
def signing(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, JwtVerifier, Path]:
    key = new_key()
    path = write_jwks(tmp_path / "jwks.json", {"k1": key})
    return key, JwtVerifier(path, "samserve", "https://idp.example"), path


def test_a_valid_token_names_its_tenant_and_rpcs(signing):
    key, verifier, _ = signing
    caller = verifier.verify(token(key))
    assert (caller.tenant, caller.subject) == ("acme", "user-1")
    assert caller.may_call("Segment") and caller.may_call("Embed") and not caller.may_call("GenerateMasks")
    assert verifier.verify(token(key, scope="samserve:*")).may_call("GenerateMasks")
    assert verifier.verify(token(key, exp=int(time.time()) - 10)).tenant == "acme"  # within the leeway


@pytest.mark.parametrize("claims, reason", [
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"exp": None}, "exp"),
    ({"aud": "someone-else"}, "(?i)audience"),
    ({"iss": "https://evil.example"}, "(?i)issuer"),
    ({"tenant": None}, "'tenant'"),
    ({"tenant": "no spaces allowed"}, "'tenant'"),
])
def test_tokens_failing_a_check_are_refused_with_the_reason(signing, claims, reason):
    key, verifier, _ = signing
    with pytest.raises(Unauthenticated, match=reason):
        verifier.verify(token(key, **claims))


def test_forged_tokens_are_refused(signing):
    key, verifier, _ = signing
    with pytest.raises(Unauthenticated, match="Signature"):
        verifier.verify(token(new_key()))  # another key under the same kid
    with pytest.raises(Unauthenticated, match="no key"):
        verifier.verify(token(key, kid="k9"))
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = jwt.decode(token(key), options={"verify_signature": False})
    for forged in (jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"}),
                   _hmac_with(public_pem, claims)):  # algorithm confusion: the public key as an HMAC secret
        with pytest.raises(Unauthenticated):
            verifier.verify(forged)
    with pytest.raises(Unauthenticated):
        verifier.verify("not.a.token")


def _hmac_with(secret: bytes, claims: dict) -> str:
    import base64
    import hashlib
    import hmac

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode()) + "." + part(
        json.dumps(claims).encode())
    return head + "." + part(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def test_a_rotated_jwks_file_is_picked_up(signing, tmp_path):
    key, verifier, path = signing
    newer = new_key()
    write_jwks(path, {"k2": newer})
    assert verifier.verify(token(newer, kid="k2")).tenant == "acme"
    with pytest.raises(Unauthenticated):
        verifier.verify(token(key))  # the retired key
    path.write_text("{broken")
    assert verifier.verify(token(newer, kid="k2")).tenant == "acme"  # a broken file keeps the last good keys
    with pytest.raises(JwksFileError):
        JwtVerifier(tmp_path / "absent.json", "samserve")


def test_bearer_tokens_are_routed_to_keys_or_jwts(signing, tmp_path):
    key, verifier, _ = signing
    keys_path = tmp_path / "keys.json"
    _, api_key = add_key(keys_path, "beta", ["Segment"])
    both = Credentials(KeyRing(keys_path), verifier)
    assert both.authorize("Segment", bearer(api_key)).tenant == "beta"
    assert both.authorize("Embed", bearer(token(key))).tenant == "acme"
    with pytest.raises(PermissionDenied, match="'acme' may not call GenerateMasks"):
        both.authorize("GenerateMasks", bearer(token(key)))
    with pytest.raises(Unauthenticated, match="JWTs only"):
        Credentials(None, verifier).authorize("Segment", bearer(api_key))
    with pytest.raises(Unauthenticated):
        Credentials(KeyRing(keys_path), None).authorize("Segment", bearer(token(key)))  # no JWKS: not a key
