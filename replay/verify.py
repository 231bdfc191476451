"""`gateway evidence verify DIR`: check an evidence package offline (no broker, no network).

It checks, and names the place of every failure:
- the manifest's signature, by the audit signer whose public key the register carries;
- every file against the manifest (a changed byte, a swapped file, a missing or an extra file);
- the exported stream: sequences contiguous and in order (a deleted or reordered event), each
  event's bytes against the digest the auditor recorded for that sequence, the hash chain
  recomputed from the events against every signed checkpoint and the manifest's chain head, and
  the last sequence against the manifest (a truncated tail).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import codec, subjects
from ..schemas.events import AuditCheckpoint
from ..services import keys
from ..services.auditor import checkpoints
from ..services.auditor.decider import GENESIS, chain
from . import package as pkg


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One failed check: where, and what is wrong."""

    where: str
    problem: str


class Report(msgspec.Struct, kw_only=True):
    """What was checked and what failed."""

    signer: str = ""
    files: int = 0
    events: int = 0
    checkpoints: int = 0
    findings: list[Finding] = msgspec.field(default_factory=list)
    # in the stream but vouching for nothing (a checkpoint the audit key did not sign): worth a look,
    # not a failure of the package
    notices: list[Finding] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.findings

    def fail(self, where: str, problem: str) -> None:
        """Record a failed check."""
        self.findings.append(Finding(where=where, problem=problem))


class Register(msgspec.Struct, kw_only=True):
    """The part of `register.json` verification needs (the rest is for people)."""

    audit_signer: keys.SignerKey


def verify(root: Path) -> Report:
    """Every check of the package in `root`."""
    report = Report()
    try:
        raw = (root / pkg.MANIFEST).read_bytes()
        manifest = msgspec.json.decode(raw, type=pkg.Manifest)
    except (OSError, msgspec.DecodeError) as exc:
        report.fail(pkg.MANIFEST, f"missing or unreadable: {exc}")
        return report
    try:
        register = msgspec.json.decode((root / pkg.REGISTER).read_bytes(), type=Register)
    except (OSError, msgspec.DecodeError) as exc:
        report.fail(pkg.REGISTER, f"missing or unreadable, so no key to check signatures with: {exc}")
        _check_files(root, manifest, report)
        return report
    signer = register.audit_signer
    report.signer = signer.kid
    _check_signature(root, raw, signer, report)
    _check_files(root, manifest, report)
    _check_stream(root, manifest, signer, report)
    return report


def _check_signature(root: Path, raw: bytes, signer: keys.SignerKey, report: Report) -> None:
    try:
        sig = msgspec.json.decode((root / pkg.MANIFEST_SIG).read_bytes(), type=pkg.ManifestSignature)
    except (OSError, msgspec.DecodeError) as exc:
        report.fail(pkg.MANIFEST_SIG, f"missing or unreadable: {exc}")
        return
    if keys.key_id(_raw_key(signer)) != signer.kid:
        report.fail(pkg.REGISTER, f"the audit signer's kid {signer.kid} does not belong to its key")
    if sig.kid != signer.kid or not keys.valid(signer.public_key, sig.signature, pkg.signing_message(raw)):
        report.fail(pkg.MANIFEST, f"the signature by {sig.kid} does not verify with the register's audit key "
                                  f"{signer.kid}: the manifest was changed or signed by another key")


def _raw_key(signer: keys.SignerKey) -> bytes:
    return base64.b64decode(signer.public_key)


def _check_files(root: Path, manifest: pkg.Manifest, report: Report) -> None:
    present = set(pkg.listed_files(root))
    for name, entry in sorted(manifest.files.items()):
        path = root / name
        if name not in present:
            report.fail(name, "listed in the manifest but missing")
            continue
        actual = pkg.file_entry(path)
        if actual != entry:
            report.fail(name, f"sha256 {actual.sha256[:16]}… ({actual.bytes} bytes) differs from the manifest's "
                              f"{entry.sha256[:16]}… ({entry.bytes} bytes): changed or swapped")
        report.files += 1
    for name in sorted(present - set(manifest.files)):
        report.fail(name, "not listed in the manifest")


def _audited_digests(root: Path, report: Report) -> dict[int, str]:
    """The digest the auditor recorded for each sequence; an unreadable table is a finding, not a crash."""
    out: dict[int, str] = {}
    for path in sorted((root / pkg.AUDIT / "events").glob("day=*/*.parquet")):
        try:
            table = pq.read_table(path, columns=["seq", "data_sha256"])
        except (OSError, ValueError, pa.ArrowException) as exc:
            report.fail(path.relative_to(root).as_posix(), f"unreadable audit table: {exc}")
            continue
        out.update(zip(table.column("seq").to_pylist(), table.column("data_sha256").to_pylist(), strict=True))
    return out


def _check_stream(root: Path, manifest: pkg.Manifest, signer: keys.SignerKey, report: Report) -> None:
    try:
        table = pq.read_table(root / pkg.STREAM, columns=["seq", "subject", "data"])
    except (OSError, ValueError, pa.ArrowException) as exc:
        report.fail(pkg.STREAM, f"unreadable: {exc}")
        return
    audited = _audited_digests(root, report)
    head, previous, heads = GENESIS, manifest.first_seq - 1, {}
    seqs, subjects_, datas = (table.column(c).to_pylist() for c in ("seq", "subject", "data"))
    for row, (seq, subject, data) in enumerate(zip(seqs, subjects_, datas, strict=True)):
        where = f"{pkg.STREAM} row {row} (seq {seq})"
        if seq > previous + 1:
            report.fail(where, f"events seq {previous + 1}..{seq - 1} are missing: deleted")
        elif seq <= previous:
            report.fail(where, f"seq {seq} comes after seq {previous}: reordered or duplicated")
        previous = max(previous, seq)
        digest = hashlib.sha256(data).hexdigest()
        if seq in audited and audited[seq] != digest:
            report.fail(where, "the event's bytes differ from the digest the auditor recorded for this seq")
        head = chain(head, seq, subject, digest)
        heads[seq] = head
        report.events += 1
        if subject == subjects.audit_checkpoint():
            _check_checkpoint(where, data, heads, signer, report)
    if previous != manifest.last_seq or report.events != manifest.events:
        report.fail(pkg.STREAM, f"ends at seq {previous} with {report.events} events, the manifest covers "
                                f"{manifest.first_seq}..{manifest.last_seq} ({manifest.events}): truncated or padded")
    if heads.get(manifest.chain_head.seq) != manifest.chain_head.head:
        report.fail(pkg.MANIFEST, f"the chain recomputed from the events does not reach the signed head at seq "
                                  f"{manifest.chain_head.seq}")


def _check_checkpoint(where: str, data: bytes, heads: dict[int, str], signer: keys.SignerKey,
                      report: Report) -> None:
    try:
        cp = codec.decode_as(data, AuditCheckpoint, subjects.audit_checkpoint())
    except codec.DecodeError:
        return  # junk stored on the subject: chained like any message, vouches for nothing
    message = checkpoints.message(cp.seq, cp.head, cp.previous_seq, cp.previous_head)
    if cp.signer != signer.kid or not keys.valid(signer.public_key, cp.signature, message):
        report.notices.append(Finding(where=where, problem=f"a checkpoint claiming seq {cp.seq} is not signed by the "
                                                           "register's audit key: it vouches for nothing"))
        return
    if heads.get(cp.seq) != cp.head:
        report.fail(where, f"the chain recomputed from the events differs from the signed checkpoint at seq "
                           f"{cp.seq}: events after seq {cp.previous_seq} through {cp.seq} were changed, deleted "
                           "or reordered")
        return
    report.checkpoints += 1
