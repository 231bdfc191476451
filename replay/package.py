"""The evidence package's layout and its manifest: one definition for the exporter and the verifier.

A package is a folder. `manifest.json` lists every other file with its sha256 and size, the range
of stream sequences exported and the chain head at the last one; `manifest.sig` is the deployment's
audit signer's Ed25519 signature over the manifest's exact bytes. The signer's public key is in
`register.json`; an assessor compares its key id with the one on the system's record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgspec

from ..schemas import codec
from ..schemas.events import PolicyActivated
from ..schemas.policy import PolicyBundle

MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"
STREAM = "stream.parquet"  # every stored message: seq, subject, stored_at, data (exact bytes)
REGISTER = "register.json"
CHECKPOINTS = "checkpoints.json"
VIOLATIONS_CSV = "violations.csv"
VIOLATIONS_PARQUET = "violations.parquet"
AUDIT = "audit"  # the auditor's Parquet tables, as written
TABLES = "tables"  # requests, decisions, invocations, spend, violations, checkpoints, policies by day
REPLAY = "replay.json"  # the replay of every decision in the exported stream, at export
DOMAIN = b"enclave-gateway/evidence-manifest/v1\n"


class FileEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One file of the package."""

    sha256: str
    bytes: int


class ChainHead(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The hash chain at the last exported message."""

    seq: int
    head: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the package holds; signed as a whole."""

    system: str
    exported_at: str
    first_seq: int
    last_seq: int
    events: int
    chain_head: ChainHead
    files: dict[str, FileEntry]
    # The analysts' tables, the violations and the document cover only days in this period; the
    # stream, the audit rows and the chain stay whole (the chain and replay need every event).
    period: str | None = None


class ReplaySummary(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`replay.json`: what replaying the exported stream gave at export; verify replays it again."""

    decisions: int
    reproduced: int
    observations: int
    mismatches: list[str]  # "seq N DecisionType request R: why", the first 100
    policies_refused: list[str]


class ManifestSignature(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`manifest.sig`."""

    kid: str
    signature: str


class PolicyRecord(msgspec.Struct, kw_only=True):
    """A policy activation as the register lists it."""

    stream_seq: int
    version: str
    sha256: str
    git_commit: str | None = None
    signer: str | None = None
    signed_at: str | None = None
    activated_by: str
    activated_at: str


def policy_history(activations: list[tuple[bytes, str, int]]) -> list[PolicyRecord]:
    """Every decodable activation stored on the policy subject, in stream order."""
    history = []
    for data, subject, seq in activations:
        try:
            e = codec.decode_as(data, PolicyActivated, subject)
        except codec.DecodeError:
            continue
        history.append(PolicyRecord(stream_seq=seq, version=e.version, sha256=e.sha256, git_commit=e.git_commit,
                                    signer=e.signer, signed_at=e.signed_at, activated_by=e.activated_by,
                                    activated_at=e.occurred_at.isoformat()))
    return history


def catalog_entries(bundle: PolicyBundle) -> list[dict[str, Any]]:
    """The register's view of a catalog: what each model is and is accredited for."""
    # as the catalog names them: a one-endpoint model reads as it always did, so registers
    # exported before models had several endpoints still verify
    return [{"id": m.id, "accreditation": m.accreditation, "status": m.status, "endpoint": m.endpoint,
             "aliases": list(m.aliases), **({"endpoints": list(m.endpoints)} if m.endpoints else {}),
             **({"max_output_tokens": m.max_output_tokens} if m.max_output_tokens else {})}
            for m in bundle.catalog.model]


def file_entry(path: Path) -> FileEntry:
    """The digest and size of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return FileEntry(sha256=h.hexdigest(), bytes=path.stat().st_size)


def listed_files(root: Path) -> list[str]:
    """Every file of a package folder but the manifest and its signature, as relative POSIX paths."""
    own = {root / MANIFEST, root / MANIFEST_SIG}
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p not in own)


def signing_message(manifest_bytes: bytes) -> bytes:
    """What the audit signer signs: the domain tag and the manifest's digest."""
    return DOMAIN + hashlib.sha256(manifest_bytes).hexdigest().encode()
