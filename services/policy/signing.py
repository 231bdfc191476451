"""Signed policy (DESIGN §3, issue 8): write access to the policy subject must never be enough to
change a decision.

A bundle is signed with a policy-signing key (Ed25519 through `cryptography`, never hand-rolled),
apart from the token issuers' keys. The signature covers a domain tag and the bundle's digest, and
the digest covers exactly the bundle's files, names included. The public keys of trusted signers
are pinned in the deployment's configuration (`gateway.toml [policy] trusted_signers`, handed to
each worker in its settings), never in the bundle or anywhere the stream can change.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ...schemas.events import PolicyActivated
from .bundle import FILES, PolicyError, digest

SIGNATURE_FILE = "bundle.sig"  # beside the bundle's files; not part of the digest
_DOMAIN = b"enclave-gateway/policy-bundle/v1\n"

TrustedSigners = Mapping[str, str]  # key id -> base64 of the raw 32-byte Ed25519 public key


class SignerKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A policy signer's public key, as pinned in the deployment's configuration."""

    kid: str
    public_key: str  # base64, raw 32 bytes


class BundleSignature(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`bundle.sig`: who signed which digest, and when.

    `signed_at` is signed too: workers apply only an activation signed later than the one they
    decide under, so replaying an older signed bundle (a rollback by whoever can make a message
    appear on the policy subject) changes nothing. A deliberate rollback is a fresh signature.
    """

    kid: str
    sha256: str
    signed_at: str  # ISO 8601, UTC
    signature: str  # base64


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    """A key's id is derived from the key itself, so a label can never point at another key."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_of(private: Ed25519PrivateKey) -> SignerKey:
    """The public half of a signing key, with its id."""
    raw = _raw(private.public_key())
    return SignerKey(kid=key_id(raw), public_key=base64.b64encode(raw).decode())


def generate() -> tuple[bytes, SignerKey]:
    """A new signing key: (PKCS#8 PEM of the private key, its public key)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, public_of(private)


def load_private(path: Path) -> Ed25519PrivateKey:
    """A signing key from its PEM file; raises PolicyError when it is not an Ed25519 key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PolicyError(f"signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public(path: Path) -> SignerKey:
    """A pinned signer's public key file; its id is checked against the key."""
    try:
        key = msgspec.json.decode(path.read_bytes(), type=SignerKey)
        raw = base64.b64decode(key.public_key, validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except (OSError, msgspec.DecodeError, ValueError) as exc:
        raise PolicyError(f"trusted signer {path}: {exc}") from exc
    if key.kid != key_id(raw):
        raise PolicyError(f"trusted signer {path}: kid {key.kid!r} does not belong to its key")
    return key


def _message(sha256: str, signed_at: str) -> bytes:
    return _DOMAIN + sha256.encode() + b"\n" + signed_at.encode()


def signing_time(signed_at: str | None) -> datetime:
    """The signed time of an activation; raises PolicyError when it is missing or not a UTC time."""
    try:
        when = datetime.fromisoformat(signed_at or "")
    except ValueError as exc:
        raise PolicyError(f"signature time {signed_at!r} is not an ISO 8601 time") from exc
    if when.utcoffset() != timedelta(0):
        raise PolicyError(f"signature time {signed_at!r} is not in UTC")
    return when


def sign_digest(private: Ed25519PrivateKey, sha256: str, now: datetime) -> BundleSignature:
    """Sign a bundle's digest at `now` (UTC)."""
    signed_at = now.astimezone(UTC).isoformat(timespec="microseconds")
    sig = private.sign(_message(sha256, signed_at))
    return BundleSignature(kid=public_of(private).kid, sha256=sha256, signed_at=signed_at,
                           signature=base64.b64encode(sig).decode())


def verify(files: dict[str, str], sha256: str, kid: str | None, signature: str | None, signed_at: str | None,
           trusted: TrustedSigners) -> datetime:
    """The signed time, when a trusted signer signed exactly these files; raises PolicyError otherwise."""
    if not signature or not kid or not signed_at:
        raise PolicyError("unsigned policy bundle")
    when = signing_time(signed_at)
    if set(files) != set(FILES):
        raise PolicyError(f"a signed bundle holds exactly {', '.join(FILES)}; this one holds {sorted(files)}")
    actual = digest(files)
    if actual != sha256:
        raise PolicyError(f"content digest {actual[:16]}… does not match the claimed {sha256[:16]}…")
    public = trusted.get(kid)
    if public is None:
        raise PolicyError(f"signer {kid!r} is not trusted by this deployment")
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public)).verify(
            base64.b64decode(signature, validate=True), _message(actual, signed_at))
    except (InvalidSignature, ValueError) as exc:
        raise PolicyError(f"signature by {kid!r} does not cover this bundle") from exc
    return when


def verify_activation(event: PolicyActivated, trusted: TrustedSigners) -> datetime:
    """The signed time of an activation a trusted signer signed exactly; raises PolicyError otherwise."""
    return verify(event.files, event.sha256, event.signer, event.signature, event.signed_at, trusted)
