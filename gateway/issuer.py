"""The development token issuer: an Ed25519 key in the data dir, and EdDSA JWTs signed with it.

In an enclave the identity service issues tokens; this issuer exists so a single machine can run
the gateway and its demo. The private key is written 0600 and never leaves the data dir.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from .services.authz.tokens import AUDIENCE, ISSUER
from .services.keys import write_private
from .services.settings import jwks_path

KEY_FILE = "issuer.key"


def ensure_keys(keys_dir: Path) -> str:
    """Create the issuer key pair and JWKS if missing; returns the key id."""
    key_path = keys_dir / KEY_FILE
    if not key_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(key_path, pem)
    key = _private_key(keys_dir)
    kid = _kid(key)
    if not jwks_path(keys_dir).exists():
        jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "alg": "EdDSA", "use": "sig"})
        write_private(jwks_path(keys_dir), json.dumps({"keys": [jwk]}, indent=2).encode())
    return kid


def _private_key(keys_dir: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((keys_dir / KEY_FILE).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{keys_dir / KEY_FILE} is not an Ed25519 key")
    return key


def _kid(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "dev-" + raw.hex()[:16]


def issue(
    keys_dir: Path,
    *,
    subject: str,
    team: str,
    roles: tuple[str, ...] = (),
    ttl_s: int = 3600,
    now: int | None = None,
    clearance: str = "UNCLASSIFIED",
    compartments: tuple[str, ...] = (),
    caveats: tuple[str, ...] = (),
    extra: dict[str, object] | None = None,
) -> str:
    """A signed session token for `subject` of `team` with its clearance, compartments and caveats."""
    kid = ensure_keys(keys_dir)
    iat = int(time.time()) if now is None else now
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "team": team,
        "roles": list(roles),
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl_s,
        "jti": uuid.uuid4().hex,
        "clearance": clearance,
        "compartments": list(compartments),
        "caveats": list(caveats),
    }
    claims.update(extra or {})
    return jwt.encode(claims, _private_key(keys_dir), algorithm="EdDSA", headers={"kid": kid})
