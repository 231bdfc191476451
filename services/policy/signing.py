"""Signed policy (DESIGN §3, issue 8): write access to the policy subject must never be enough to
change a decision.

A bundle is signed with a policy-signing key (Ed25519 through `cryptography`, never hand-rolled),
apart from the token issuers' keys. The signature covers a domain tag and the bundle's digest, and
the digest covers exactly the bundle's files, names included. The public keys of trusted signers
are pinned in the deployment's configuration (`gateway.toml [policy] trusted_signers`, handed to
each worker in its settings), never in the bundle or anywhere the stream can change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...schemas.events import PolicyActivated
from .. import keys
from ..keys import SignerKey
from .bundle import FILES, OPTIONAL, REQUIRED, PolicyError, digest

SIGNATURE_FILE = "bundle.sig"  # beside the bundle's files; not part of the digest
_DOMAIN = b"enclave-gateway/policy-bundle/v1\n"

TrustedSigners = Mapping[str, str]  # key id -> base64 of the raw 32-byte Ed25519 public key


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


def load_private(path: Path) -> Ed25519PrivateKey:
    """A policy-signing key; raises PolicyError when it is not an Ed25519 key."""
    try:
        return keys.load_private(path)
    except keys.KeyFileError as exc:
        raise PolicyError(str(exc)) from exc


def load_public(path: Path) -> SignerKey:
    """A pinned signer's public key file; its id is checked against the key."""
    try:
        return keys.load_public(path)
    except keys.KeyFileError as exc:
        raise PolicyError(f"trusted signer: {exc}") from exc


def _message(sha256: str, signed_at: str, dev_issuers_jwks: str | None = None) -> bytes:
    message = _DOMAIN + sha256.encode() + b"\n" + signed_at.encode()
    if dev_issuers_jwks is not None:  # the dev issuer's keys, when an activation carries them, are signed too
        message += b"\ndev-issuers " + hashlib.sha256(dev_issuers_jwks.encode()).hexdigest().encode()
    return message


def signing_time(signed_at: str | None) -> datetime:
    """The signed time of an activation; raises PolicyError when it is missing or not a UTC time."""
    try:
        when = datetime.fromisoformat(signed_at or "")
    except ValueError as exc:
        raise PolicyError(f"signature time {signed_at!r} is not an ISO 8601 time") from exc
    if when.utcoffset() != timedelta(0):
        raise PolicyError(f"signature time {signed_at!r} is not in UTC")
    return when


def sign_digest(private: Ed25519PrivateKey, sha256: str, now: datetime,
                dev_issuers_jwks: str | None = None) -> BundleSignature:
    """Sign a bundle's digest at `now` (UTC), and the dev issuer's keys when the activation carries them."""
    signed_at = now.astimezone(UTC).isoformat(timespec="microseconds")
    return BundleSignature(kid=keys.public_of(private).kid, sha256=sha256, signed_at=signed_at,
                           signature=keys.sign(private, _message(sha256, signed_at, dev_issuers_jwks)))


def verify(files: dict[str, str], sha256: str, kid: str | None, signature: str | None, signed_at: str | None,
           trusted: TrustedSigners, dev_issuers_jwks: str | None = None) -> datetime:
    """The signed time, when a trusted signer signed exactly these files; raises PolicyError otherwise."""
    if not signature or not kid or not signed_at:
        raise PolicyError("unsigned policy bundle")
    when = signing_time(signed_at)
    if not set(REQUIRED) <= set(files) <= set(FILES):
        raise PolicyError(f"a signed bundle holds {', '.join(REQUIRED)} and may hold {', '.join(OPTIONAL)}; "
                          f"this one holds {sorted(files)}")
    actual = digest(files)
    if actual != sha256:
        raise PolicyError(f"content digest {actual[:16]}… does not match the claimed {sha256[:16]}…")
    public = trusted.get(kid)
    if public is None:
        raise PolicyError(f"signer {kid!r} is not trusted by this deployment")
    if not keys.valid(public, signature, _message(actual, signed_at, dev_issuers_jwks)):
        raise PolicyError(f"signature by {kid!r} does not cover this bundle")
    return when


def verify_activation(event: PolicyActivated, trusted: TrustedSigners) -> datetime:
    """The signed time of an activation a trusted signer signed exactly; raises PolicyError otherwise."""
    return verify(event.files, event.sha256, event.signer, event.signature, event.signed_at, trusted,
                  event.dev_issuers_jwks)
