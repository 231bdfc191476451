"""Operator side of signed policy: signing keys, `gateway policy sign`, and the activation event.

Keys: `gateway policy keygen --out NAME` writes `NAME.key` (Ed25519 private key, PKCS#8 PEM, 0600)
and `NAME.pub.json` (key id and public key), which a deployment pins in `gateway.toml`
(`[policy] trusted_signers`). With none pinned, `gateway up` makes a dev signer in the data dir
and trusts only it, and says so: an enclave replaces it before an assessment (docs/security.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec

from .schemas.events import PolicyActivated, envelope
from .services.authz.policy_view import validate
from .services.keys import generate, write_private
from .services.policy import SIGNATURE_FILE, BundleSignature, PolicyError, SignerKey, digest, read_files
from .services.policy.bundle import bundle_from_files, git_commit
from .services.policy.signing import load_private, load_public, sign_digest, verify

DEV_SIGNER = "policy-signer"  # in <data_dir>/keys


def keygen(stem: Path) -> SignerKey:
    """A new signing key: `<stem>.key` (0600) and `<stem>.pub.json`; refuses to overwrite."""
    key_file, pub_file = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub.json")
    if key_file.exists():
        raise FileExistsError(f"{key_file} exists; a signing key is never overwritten")
    pem, public = generate()
    write_private(key_file, pem)
    pub_file.write_bytes(msgspec.json.encode(public))
    return public


def dev_signer(keys_dir: Path) -> tuple[Path, SignerKey, bool]:
    """The dev policy signer of a data dir: (private key file, public key, made just now)."""
    stem = keys_dir / DEV_SIGNER
    key_file = stem.with_name(stem.name + ".key")
    if key_file.exists():
        return key_file, load_public(stem.with_name(stem.name + ".pub.json")), False
    return key_file, keygen(stem), True


def trusted(paths: list[Path]) -> dict[str, str]:
    """Pinned signers by key id, from their public key files."""
    keys = [load_public(p) for p in paths]
    return {k.kid: k.public_key for k in keys}


def validated_files(folder: Path) -> dict[str, str]:
    """A folder's bundle files after every check a decision depends on; raises PolicyError."""
    files = read_files(folder)
    validate(bundle_from_files(files))
    return files


def sign_folder(folder: Path, key_file: Path) -> BundleSignature:
    """Validate a bundle and write its `bundle.sig`."""
    files = validated_files(folder)
    sig = sign_digest(load_private(key_file), digest(files), datetime.now(UTC))
    (folder / SIGNATURE_FILE).write_bytes(msgspec.json.encode(sig))
    return sig


def read_signature(folder: Path) -> BundleSignature | None:
    """The folder's `bundle.sig`, if it has one."""
    path = folder / SIGNATURE_FILE
    if not path.exists():
        return None
    try:
        return msgspec.json.decode(path.read_bytes(), type=BundleSignature)
    except msgspec.DecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


def activation(folder: Path, activated_by: str, now: datetime, signers: dict[str, str],
               fallback_key: Path | None = None, dev_issuers_jwks: str | None = None) -> PolicyActivated:
    """The signed PolicyActivated for a folder's bundle; raises PolicyError when it is invalid,
    unsigned, signed for other content, or signed by a key this deployment does not trust.

    `fallback_key` signs a bundle that has no `bundle.sig` (the dev signer of `gateway up`).
    """
    files = validated_files(folder)
    sha = digest(files)
    sig = read_signature(folder)
    carried = None
    if sig is None and fallback_key is not None:  # the dev signer signs here, and may vouch for the dev issuer
        carried = dev_issuers_jwks
        sig = sign_digest(load_private(fallback_key), sha, now, carried)
    if sig is None:
        raise PolicyError(f"{folder} is not signed: run `gateway policy sign --key KEY --dir {folder}`")
    if sig.sha256 != sha:
        raise PolicyError(f"{folder / SIGNATURE_FILE} signs other content ({sig.sha256[:16]}…): sign it again")
    verify(files, sha, sig.kid, sig.signature, sig.signed_at, signers, carried)  # workers check it again
    version = bundle_from_files(files).version
    # The time is part of the id: re-activating an earlier version (a rollback) is a new fact.
    request_id = f"policy-{version}-{now.strftime('%Y%m%dT%H%M%S%f')}"
    return PolicyActivated(
        **envelope(request_id, "activate", now, version),
        version=version,
        sha256=sha,
        git_commit=git_commit(folder),
        activated_by=activated_by,
        files=files,
        signature=sig.signature,
        signer=sig.kid,
        signed_at=sig.signed_at,
        dev_issuers_jwks=carried,
    )
