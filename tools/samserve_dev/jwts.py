"""Signing keys, JWKS files and JWTs for the auth tests (EC P-256, ES256), as an identity provider makes them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_jwks(path: Path, keys: dict[str, ec.EllipticCurvePrivateKey]) -> Path:
    jwks = {"keys": [{**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid,
                      "use": "sig", "alg": "ES256"} for kid, key in keys.items()]}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(jwks))
    os.replace(temporary, path)  # as a Secret update does: a new inode
    return path


def token(key: ec.EllipticCurvePrivateKey, kid: str = "k1", **claims: object) -> str:
    now = int(time.time())
    body = {"aud": "samserve", "iss": "https://idp.example", "exp": now + 300, "iat": now, "sub": "user-1",
            "tenant": "acme", "scope": "openid samserve:Segment samserve:Embed"}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="ES256", headers={"kid": kid})
