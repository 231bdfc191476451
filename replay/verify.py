"""`gateway evidence verify DIR [--audit-key PUB]`: check an evidence package offline (no broker,
no network), naming the place of every failure.

Trust starts from the audit signer's public key. Given `--audit-key` (the deployment's
`audit-signer.pub.json`, obtained out of band), the register's key must be that key; without it the
package can at best be consistent with itself, and the report says so (unanchored).

Then nothing in the package is taken on its word; everything derived is derived again:
- only regular files count: a symlink, FIFO or device anywhere is refused unread;
- the manifest's signature by the audit key, and every file against the manifest;
- the exported stream from seq 1: contiguous, in order, well-typed; the hash chain recomputed from
  it against every signed checkpoint and the signed head; the tail against the manifest;
- the audit tables rebuilt from the stream by the auditor's own decider: one row per event, every
  column equal (the keyed prompt and completion digests, whose key never leaves the deployment,
  only for presence), the chain hash included;
- the violations CSV and Parquet against the denials rebuilt from the stream; `checkpoints.json`,
  the register's policy history, policy in force and catalog against the stream.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import operator
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..schemas import codec, subjects
from ..schemas.events import AnyEvent, AuditCheckpoint
from ..services import fact_signatures, keys
from ..services.auditor import checkpoints
from ..services.auditor.decider import GENESIS, AuditorState, AuditRow, row_of
from ..services.auditor.parquet_sink import SCHEMA, VIOLATION_COLUMNS
from ..services.policy import bundle_from_files
from ..services.policy.feed import latest_valid
from . import package as pkg
from . import tables
from .engine import replay_decoded

MAX_JSON_BYTES = 64 << 20
KEYED = ("prompt_hmac", "completion_hmac")  # the digest key stays in the deployment: presence only
STREAM_FIELDS = {"seq": pa.int64(), "subject": pa.string(), "stored_at": pa.timestamp("us", "UTC"),
                 "data": pa.binary()}
# Each fact's stage signature; a package exported before facts were signed has none of these columns.
SIGNATURE_FIELDS = {column: pa.string() for _, column in fact_signatures.HEADER_COLUMNS}
StreamRow = tuple[int, int, str, bytes, datetime, dict[str, str] | None]


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One failed check: where, and what is wrong."""

    where: str
    problem: str


class Report(msgspec.Struct, kw_only=True):
    """What was checked and what failed."""

    signer: str = ""
    fingerprint: str = ""  # sha256 of the audit signer's raw public key, in full
    anchored: bool = False
    files: int = 0
    events: int = 0
    checkpoints: int = 0
    first_seq: int = 0
    last_seq: int = 0
    findings: list[Finding] = msgspec.field(default_factory=list)
    notices: list[Finding] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.findings

    def fail(self, where: str, problem: str) -> None:
        """Record a failed check."""
        self.findings.append(Finding(where=where, problem=problem))

    def notice(self, where: str, problem: str) -> None:
        """Record something worth a look that is not a failure of the package."""
        self.notices.append(Finding(where=where, problem=problem))


class Register(msgspec.Struct, kw_only=True):
    """`register.json`."""

    system: str
    audit_signer: keys.SignerKey
    policy_signers: dict[str, str]
    policy_in_force: str | None
    policies: list[pkg.PolicyRecord]
    catalog: list[dict[str, Any]]
    token_issuers: Any = None
    dev_token_issuer: Any = None
    fact_signers: dict[str, str] = {}  # identity -> NKey public key; empty in packages made before signatures


def verify(root: Path, anchor: keys.SignerKey | None = None) -> Report:
    """Every check of the package in `root`; never raises for what the package holds."""
    report = Report()
    regular = _regular_files(root, report)
    manifest_raw = _read_small(root, pkg.MANIFEST, regular, report)
    register_raw = _read_small(root, pkg.REGISTER, regular, report)
    if manifest_raw is None or register_raw is None:
        return report
    try:
        manifest = msgspec.json.decode(manifest_raw, type=pkg.Manifest)
    except msgspec.DecodeError as exc:
        report.fail(pkg.MANIFEST, f"unreadable: {exc}")
        return report
    try:
        register = msgspec.json.decode(register_raw, type=Register)
        signer_raw = base64.b64decode(register.audit_signer.public_key, validate=True)
    except (msgspec.DecodeError, ValueError) as exc:
        report.fail(pkg.REGISTER, f"unreadable, so no key to check signatures with: {exc}")
        _check_files(root, manifest, regular, report)
        return report
    report.signer, report.fingerprint = register.audit_signer.kid, hashlib.sha256(signer_raw).hexdigest()
    report.first_seq, report.last_seq = manifest.first_seq, manifest.last_seq
    _anchor(register.audit_signer, anchor, report)
    steps: list[tuple[str, Callable[[], None]]] = [
        (pkg.MANIFEST_SIG, lambda: _check_signature(root, manifest_raw, register.audit_signer, regular, report)),
        ("files", lambda: _check_files(root, manifest, regular, report)),
        (pkg.STREAM, lambda: _check_everything_derived(root, manifest, register, regular, report)),
    ]
    for where, step in steps:
        try:
            step()
        except Exception as exc:  # a malformed package is a finding with its place, never a traceback
            report.fail(where, f"could not be checked: {exc!r}")
    return report


def _regular_files(root: Path, report: Report) -> set[str]:
    """Relative paths of the package's regular files; anything else is refused without reading it."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                report.fail(rel, "a symbolic link: refused, a package holds regular files only")
            elif name in files and not stat.S_ISREG(mode):
                report.fail(rel, "not a regular file (FIFO, socket or device): refused unread")
            elif name in files:
                found.add(rel)
    return found


def _read_small(root: Path, name: str, regular: set[str], report: Report) -> bytes | None:
    if name not in regular:
        report.fail(name, "missing, or not a regular file")
        return None
    if (root / name).stat().st_size > MAX_JSON_BYTES:
        report.fail(name, f"larger than {MAX_JSON_BYTES} bytes: refused")
        return None
    return (root / name).read_bytes()


def _anchor(signer: keys.SignerKey, anchor: keys.SignerKey | None, report: Report) -> None:
    if anchor is None:
        report.notice(pkg.REGISTER, "UNANCHORED: the register's audit key was not compared with a trusted copy "
                                    "(--audit-key); whoever made the package could have signed it with any key")
        return
    report.anchored = True
    if signer.public_key != anchor.public_key:
        report.fail(pkg.REGISTER, f"the audit key {signer.kid} is not the trusted audit key {anchor.kid}: "
                                  "the package was signed by someone else")


def _check_signature(root: Path, raw: bytes, signer: keys.SignerKey, regular: set[str], report: Report) -> None:
    sig_raw = _read_small(root, pkg.MANIFEST_SIG, regular, report)
    if sig_raw is None:
        return
    sig = msgspec.json.decode(sig_raw, type=pkg.ManifestSignature)
    if keys.key_id(base64.b64decode(signer.public_key)) != signer.kid:
        report.fail(pkg.REGISTER, f"the audit signer's kid {signer.kid} does not belong to its key")
    if sig.kid != signer.kid or not keys.valid(signer.public_key, sig.signature, pkg.signing_message(raw)):
        report.fail(pkg.MANIFEST, f"the signature by {sig.kid} does not verify with the register's audit key "
                                  f"{signer.kid}: the manifest was changed or signed by another key")


def _check_files(root: Path, manifest: pkg.Manifest, regular: set[str], report: Report) -> None:
    for name, entry in sorted(manifest.files.items()):
        if name not in regular:
            report.fail(name, "listed in the manifest but missing (or not a regular file)")
            continue
        actual = pkg.file_entry(root / name)
        if actual != entry:
            report.fail(name, f"sha256 {actual.sha256[:16]}… ({actual.bytes} bytes) differs from the manifest's "
                              f"{entry.sha256[:16]}… ({entry.bytes} bytes): changed or swapped")
        report.files += 1
    for name in sorted(regular - set(manifest.files) - {pkg.MANIFEST, pkg.MANIFEST_SIG}):
        report.fail(name, "not listed in the manifest")


class _Rebuilt(msgspec.Struct, kw_only=True):
    """What the stream says every derived file must hold."""

    rows: dict[int, AuditRow] = msgspec.field(default_factory=dict)
    decoded: list[tuple[int, AnyEvent | None]] = msgspec.field(default_factory=list)  # None: not an event
    older: dict[int, int] = msgspec.field(default_factory=dict)  # seq -> version, for events stored at an old one
    checkpoints: list[AuditCheckpoint] = msgspec.field(default_factory=list)
    activations: list[tuple[bytes, str, int]] = msgspec.field(default_factory=list)


def _check_everything_derived(root: Path, manifest: pkg.Manifest, register: Register, regular: set[str],
                              report: Report) -> None:
    rebuilt = _check_stream(root, manifest, register, regular, report)
    if rebuilt is None:
        return
    _check_audit_tables(root, manifest, rebuilt, regular, report)
    _check_violations(root, rebuilt, regular, report, manifest.period)
    _check_register(root, register, rebuilt, report)
    _check_replay(root, register, rebuilt, regular, report)
    _check_tables(root, regular, report, manifest.period)


def _stream_batches(path: Path, report: Report) -> tuple[Iterator[StreamRow], bool] | None:
    """(row, seq, subject, data, stored_at, signature headers) in file order, in bounded batches;
    None when the schema is wrong. The flag says whether the stream carries signature columns; the
    headers are None in a package made before facts were signed."""
    pf = pq.ParquetFile(path)
    fields = {f.name: f.type for f in pf.schema_arrow}
    if any(fields.get(name) != kind for name, kind in STREAM_FIELDS.items()):
        report.fail(pkg.STREAM, f"columns {fields} are not {STREAM_FIELDS}")
        return None
    signed = all(fields.get(name) == kind for name, kind in SIGNATURE_FIELDS.items())
    columns = [*STREAM_FIELDS, *(SIGNATURE_FIELDS if signed else ())]

    def rows() -> Iterator[StreamRow]:
        n = 0
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            cols = [batch.column(i).to_pylist() for i in range(len(columns))]
            for seq, subject, stored_at, data, *sig in zip(*cols, strict=True):
                if seq is None or subject is None or data is None or stored_at is None:
                    report.fail(f"{pkg.STREAM} row {n}", "a null seq, subject, time or body")
                else:
                    yield n, seq, subject, data, stored_at, fact_signatures.from_columns(sig) if signed else None
                n += 1

    return rows(), signed


def _check_stream(root: Path, manifest: pkg.Manifest, register: Register, regular: set[str],
                  report: Report) -> _Rebuilt | None:
    signer = register.audit_signer
    if pkg.STREAM not in regular:
        return None
    read = _stream_batches(root / pkg.STREAM, report)
    if read is None:
        return None
    batches, signed = read
    if manifest.first_seq != 1:
        report.fail(pkg.MANIFEST, f"starts at seq {manifest.first_seq}: the chain is anchored only from the "
                                  "stream's first event")
    rebuilt, state = _Rebuilt(), AuditorState()
    heads: dict[int, str] = {0: GENESIS}
    previous = 0
    pins = fact_signatures.Pins.of(register.fact_signers) if register.fact_signers else None
    for row, seq, subject, data, stored_at, headers in batches:
        where = f"{pkg.STREAM} row {row} (seq {seq})"
        if seq > previous + 1:
            report.fail(where, f"events seq {previous + 1}..{seq - 1} are missing: deleted")
        elif seq <= previous:
            report.fail(where, f"seq {seq} comes after seq {previous}: reordered or duplicated")
            continue
        previous = seq
        try:
            event: AnyEvent | codec.DecodeError
            if pins is not None and headers is not None:  # a fact counts only with its owner's signature
                pins.owner(subject, headers, data)
            event, version = codec.decode_event_versioned(data, subject)
            if version != event.schema_version:
                rebuilt.older[seq] = version
        except codec.DecodeError as exc:
            event = exc
            if isinstance(exc, codec.UnsignedFact):
                report.notice(where, f"{exc}: recorded, and counted as no fact")
        rebuilt.decoded.append((seq, None if isinstance(event, codec.DecodeError) else event))
        audit_row, state = row_of(state, seq, subject, data, stored_at, None, event)  # decoded once, for both
        rebuilt.rows[seq] = audit_row
        heads[seq] = state.head
        report.events += 1
        if isinstance(event, codec.UnsignedFact):
            continue  # chained, vouches for nothing, activates nothing
        if subject == subjects.audit_checkpoint():
            _check_checkpoint(where, data, heads, signer, rebuilt, report)
        elif subject == subjects.policy_activated():
            rebuilt.activations.append((data, subject, seq))
    if previous != manifest.last_seq or report.events != manifest.events:
        report.fail(pkg.STREAM, f"ends at seq {previous} with {report.events} events, the manifest covers "
                                f"{manifest.first_seq}..{manifest.last_seq} ({manifest.events}): truncated or padded")
    if manifest.chain_head.seq != manifest.last_seq or heads.get(manifest.chain_head.seq) != manifest.chain_head.head:
        report.fail(pkg.MANIFEST, f"the chain recomputed from the events does not reach the signed head at seq "
                                  f"{manifest.chain_head.seq}")
    if pins is None or not signed:
        report.notice(pkg.STREAM, "no stage signatures were checked: the package predates them or names no signers")
    if report.checkpoints == 0 and report.events:
        report.notice(pkg.STREAM, "no signed checkpoint: only the manifest's signature vouches for the events")
    return rebuilt


def _check_checkpoint(where: str, data: bytes, heads: dict[int, str], signer: keys.SignerKey, rebuilt: _Rebuilt,
                      report: Report) -> None:
    try:
        cp = codec.decode_as(data, AuditCheckpoint, subjects.audit_checkpoint())
    except codec.DecodeError:
        return  # junk stored on the subject: chained like any message, vouches for nothing
    rebuilt.checkpoints.append(cp)  # checkpoints.json lists every one found; only valid ones vouch
    if not checkpoints.signed_by(cp, signer):
        report.notice(where, f"a checkpoint claiming seq {cp.seq} is not signed by the register's audit key: it "
                             "vouches for nothing")
        return
    if heads.get(cp.seq) != cp.head:
        report.fail(where, f"the chain recomputed from the events differs from the signed checkpoint at seq "
                           f"{cp.seq}: events after seq {cp.previous_seq} through {cp.seq} were changed, deleted "
                           "or reordered")
        return
    report.checkpoints += 1


def _plain(row: AuditRow) -> dict[str, Any]:
    return dict(msgspec.to_builtins(row, builtin_types=(datetime,)))


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in SCHEMA.names}
    for k in KEYED:
        out[k] = out[k] is not None
    if isinstance(when := out.get("occurred_at"), datetime):
        out["occurred_at"] = when.astimezone(UTC)
    return out


def _check_audit_tables(root: Path, manifest: pkg.Manifest, rebuilt: _Rebuilt, regular: set[str],
                        report: Report) -> None:
    seen: set[int] = set()
    changed_at: int | None = None  # the first event whose bytes differ from what the auditor recorded
    for name in sorted(n for n in manifest.files if n.startswith(f"{pkg.AUDIT}/events/") and n in regular):
        try:
            table = pq.read_table(root / name)
        except (OSError, ValueError, pa.ArrowException) as exc:
            report.fail(name, f"unreadable audit table: {exc}")
            continue
        for row in _rows_that_may_differ(table, rebuilt, seen):
            seq = row.get("seq")
            if not isinstance(seq, int) or seq not in rebuilt.rows or seq in seen:
                report.fail(name, f"row for seq {seq!r}: no such event in the stream, or a second row for it")
                continue
            seen.add(seq)
            expected = _comparable(_plain(rebuilt.rows[seq]))
            differing = [k for k, v in _comparable(row).items() if v != expected[k]]
            if "data_sha256" in differing:
                report.fail(f"{pkg.STREAM} (seq {seq})", "the event's bytes differ from the digest the auditor "
                                                         f"recorded for this seq in {name}")
                changed_at = seq if changed_at is None else min(changed_at, seq)
            elif differing == ["chain_hash"] and changed_at is not None and seq > changed_at:
                continue  # follows from the changed event above
            elif differing:
                report.fail(name, f"row for seq {seq} differs from the stream in {', '.join(differing)}")
    missing = sorted(set(rebuilt.rows) - seen)
    if missing:
        report.fail(f"{pkg.AUDIT}/events", f"{len(missing)} event(s) have no audit row, first seq {missing[0]}")


_ROW_VALUES = operator.attrgetter(*SCHEMA.names)  # an AuditRow's values in the table's column order


def _rows_that_may_differ(table: pa.Table, rebuilt: _Rebuilt, seen: set[int]) -> Iterator[dict[str, Any]]:
    """The rows of an audit table the row-by-row check must look at, in file order.

    Rows equal to what the stream gives are counted as seen here, column by column in Arrow (a
    million rows compared as Python dicts took most of a verify); every other row, and every row of
    a table whose schema is not exactly the auditor's, goes to the row-by-row check that names what
    differs.
    """
    if table.schema.names != SCHEMA.names or any(table.schema.field(n).type != SCHEMA.field(n).type
                                                 for n in SCHEMA.names):
        yield from table.to_pylist()
        return
    seqs = table.column("seq").to_pylist()
    fresh: set[int] = set()
    known: list[bool] = []  # a stream event not seen before (the first row of a seq in this table)
    for q in seqs:
        ok = isinstance(q, int) and q in rebuilt.rows and q not in seen and q not in fresh
        known.append(ok)
        if ok:
            fresh.add(q)
    expected = [rebuilt.rows[q] for q, ok in zip(seqs, known, strict=True) if ok]
    picked = table.filter(pa.array(known, type=pa.bool_()))
    same = pa.array([True] * len(expected), type=pa.bool_())
    columns = zip(*map(_ROW_VALUES, expected), strict=True) if expected else iter([()] * len(SCHEMA))
    for field, values in zip(SCHEMA, columns, strict=True):
        actual = picked.column(field.name)
        try:
            wanted = pa.array(values, type=field.type)
        except (pa.ArrowException, OverflowError):  # a value the auditor's column cannot hold: row by row
            yield from table.to_pylist()
            return
        if field.name in KEYED:  # presence only: the digest key stays in the deployment
            equal = pc.equal(actual.is_valid(), wanted.is_valid())
        else:
            equal = pc.or_(pc.fill_null(pc.equal(actual, wanted), False),
                           pc.and_(actual.is_null(), wanted.is_null()))
        same = pc.and_(same, equal)
    matched = iter(same.to_pylist())
    for i, ok in enumerate(known):
        if ok and next(matched):
            seen.add(seqs[i])
        else:
            yield table.slice(i, 1).to_pylist()[0]


def _check_violations(root: Path, rebuilt: _Rebuilt, regular: set[str], report: Report, period: str | None) -> None:
    denials = [_plain(r) for _, r in sorted(rebuilt.rows.items())
               if r.type == "RequestDenied" and (period is None or r.day.startswith(period))]
    expected = [[str(d[c]) if d[c] is not None else "" for c in ("seq", "request_id", "rule", "reason")]
                for d in denials]
    if pkg.VIOLATIONS_CSV in regular:
        text = (root / pkg.VIOLATIONS_CSV).read_text(errors="replace")
        found = [[r.get(c) or "" for c in ("seq", "request_id", "rule", "reason")] for r in csv.DictReader(
            io.StringIO(text))]
        if found != expected:
            report.fail(pkg.VIOLATIONS_CSV, f"holds {len(found)} denial(s); the stream holds {len(expected)} "
                                            "(or they differ in seq, request, rule or reason)")
    if pkg.VIOLATIONS_PARQUET in regular:
        rows = [_violation(r) for r in pq.read_table(root / pkg.VIOLATIONS_PARQUET).to_pylist()]
        if rows != [_violation(d) for d in denials]:
            report.fail(pkg.VIOLATIONS_PARQUET, f"holds {len(rows)} row(s) that are not the stream's "
                                                f"{len(denials)} denial(s)")
    elif denials:
        report.fail(pkg.VIOLATIONS_PARQUET, f"missing while the stream holds {len(denials)} denial(s)")


def _check_replay(root: Path, register: Register, rebuilt: _Rebuilt, regular: set[str], report: Report) -> None:
    """Replay the exported stream again: the result must be the one the package records."""
    if pkg.REPLAY not in regular:
        report.fail(pkg.REPLAY, "missing: the package must record the replay of its decisions")
        return
    recorded = msgspec.json.decode((root / pkg.REPLAY).read_bytes(), type=pkg.ReplaySummary)
    jwks = [msgspec.json.encode(register.dev_token_issuer).decode()] if register.dev_token_issuer else []
    result = replay_decoded(rebuilt.decoded, jwks, trusted=register.policy_signers, older=rebuilt.older)
    again = [f"seq {m.seq} {m.decision} request {m.request_id}: {m.why}" for m in result.mismatches[:100]]
    if (result.decisions, result.reproduced, result.observations, again) != (
            recorded.decisions, recorded.reproduced, recorded.observations, recorded.mismatches):
        report.fail(pkg.REPLAY, f"records {recorded.reproduced} of {recorded.decisions} decisions reproduced; "
                                f"replaying the exported stream gives {result.reproduced} of {result.decisions}")
    if result.mismatches:
        report.notice(pkg.REPLAY, f"{len(result.mismatches)} recorded decision(s) are not reproduced by replay, "
                                  f"first: {again[0]} (gateway replay --package DIR shows each)")


def _check_tables(root: Path, regular: set[str], report: Report, period: str | None) -> None:
    """Each analysts' table must be exactly what its one definition gives over the audit rows."""
    events = sorted(n for n in regular if n.startswith(f"{pkg.AUDIT}/events/") and n.endswith(".parquet"))
    if not events:
        return
    con = duckdb.connect()
    try:
        listing = ", ".join(f"'{root / n}'" for n in events)
        con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet([{listing}], hive_partitioning=false, "
                    "union_by_name=true)")
        for name, sql in tables.TABLES.items():
            folder = root / pkg.TABLES / name
            if any(n.startswith(f"{pkg.TABLES}/{name}/") for n in regular):
                wrong = tables.differs(con, name, folder, period)
                if wrong:
                    report.fail(f"{pkg.TABLES}/{name}", f"{wrong} row(s) are not what the audit rows give")
            elif con.execute(f"SELECT count(*) FROM ({sql}) WHERE {tables.in_period(period)}").fetchone() != (0,):
                report.fail(f"{pkg.TABLES}/{name}", "missing while the audit rows hold some")
    finally:
        con.close()


def _violation(row: dict[str, Any]) -> dict[str, Any]:
    return {c: v.astimezone(UTC) if isinstance(v := row.get(c), datetime) else v for c in VIOLATION_COLUMNS}


def _check_register(root: Path, register: Register, rebuilt: _Rebuilt, report: Report) -> None:
    stored = msgspec.json.decode((root / pkg.CHECKPOINTS).read_bytes(), type=list[AuditCheckpoint])
    if stored != rebuilt.checkpoints:
        report.fail(pkg.CHECKPOINTS, f"lists {len(stored)} checkpoint(s); the stream holds "
                                     f"{len(rebuilt.checkpoints)} signed by the audit key (or they differ)")
    history = pkg.policy_history(rebuilt.activations)
    if msgspec.to_builtins(history) != msgspec.to_builtins(register.policies):
        report.fail(pkg.REGISTER, "its policy history is not the activations in the stream")
    active = latest_valid(rebuilt.activations, register.policy_signers)
    if (active.version if active else None) != register.policy_in_force:
        report.fail(pkg.REGISTER, f"policy in force {register.policy_in_force} is not the stream's latest validly "
                                  f"signed activation {active.version if active else None}")
    if active is not None and pkg.catalog_entries(bundle_from_files(active.files)) != register.catalog:
        report.fail(pkg.REGISTER, "its catalog is not the catalog of the policy in force")
