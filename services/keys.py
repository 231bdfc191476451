"""Ed25519 signing keys of the deployment (through `cryptography`, never hand-rolled): the policy
signers' and the auditor's. A key's id is derived from the key itself, so a label can never point
at another key."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, or not the Ed25519 key it claims to be."""


class SignerKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A signer's public key, as pinned in configuration or published in the register."""

    kid: str
    public_key: str  # base64, raw 32 bytes


def key_id(public_raw: bytes) -> str:
    """`ed25519:` and the first 16 hex digits of the sha256 of the raw public key."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_of(private: Ed25519PrivateKey) -> SignerKey:
    """The public half of a signing key, with its id."""
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SignerKey(kid=key_id(raw), public_key=base64.b64encode(raw).decode())


def generate() -> tuple[bytes, SignerKey]:
    """A new signing key: (PKCS#8 PEM of the private key, its public key)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, public_of(private)


def write_private(path: Path, data: bytes) -> None:
    """Create or replace a file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # also when it existed with looser bits


def ensure_key(key_file: Path) -> Ed25519PrivateKey:
    """The signing key in `key_file`, made (0600) with its `.pub.json` beside it when absent."""
    if not key_file.exists():
        pem, public = generate()
        write_private(key_file, pem)
        key_file.with_name(key_file.name.removesuffix(".key") + ".pub.json").write_bytes(msgspec.json.encode(public))
    return load_private(key_file)


def ensure_secret(path: Path, size: int = 32) -> bytes:
    """A random secret in `path` (0600), made once."""
    if not path.exists():
        write_private(path, os.urandom(size))
    secret = path.read_bytes()
    if len(secret) < size:
        raise KeyFileError(f"secret {path} holds {len(secret)} bytes, fewer than {size}")
    return secret


def load_private(path: Path) -> Ed25519PrivateKey:
    """A signing key from its PEM file; raises KeyFileError when it is not an Ed25519 key."""
    try:
        return load_private_pem(path.read_bytes())
    except (OSError, KeyFileError) as exc:
        raise KeyFileError(f"signing key {path}: {exc}") from exc


def load_private_pem(pem: bytes) -> Ed25519PrivateKey:
    """A signing key from PEM bytes; raises KeyFileError when it is not an Ed25519 key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(str(exc)) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("not an Ed25519 key")
    return key


def load_public(path: Path) -> SignerKey:
    """A public key file; its id is checked against the key."""
    try:
        key = msgspec.json.decode(path.read_bytes(), type=SignerKey)
        raw = base64.b64decode(key.public_key, validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except (OSError, msgspec.DecodeError, ValueError) as exc:
        raise KeyFileError(f"public key {path}: {exc}") from exc
    if key.kid != key_id(raw):
        raise KeyFileError(f"public key {path}: kid {key.kid!r} does not belong to its key")
    return key


def sign(private: Ed25519PrivateKey, message: bytes) -> str:
    """A base64 Ed25519 signature."""
    return base64.b64encode(private.sign(message)).decode()


def valid(public_b64: str, signature_b64: str, message: bytes) -> bool:
    """Whether `signature_b64` is the key's signature over `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64)).verify(
            base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True
