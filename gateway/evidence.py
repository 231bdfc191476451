"""`gateway evidence export DIR`: the package an assessor verifies offline.

It holds the exported stream (every stored message, exact bytes), the auditor's Parquet tables,
the violations feed as CSV and Parquet, the register (the audit signer's public key, the pinned
policy signers, the policy versions activated and the catalog in force), the checkpoints, and
`manifest.json` signed by the deployment's audit signer. `replay/verify.py` checks it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from nats.js import JetStreamContext
from rich.progress import Progress

from . import oscal
from .replay import package as pkg
from .replay import tables
from .replay.engine import replay
from .runtime import wait_audited
from .schemas import codec, subjects
from .schemas.events import AuditCheckpoint
from .services import bus, fact_signatures, keys
from .services.auditor.decider import GENESIS, chain
from .services.auditor.parquet_sink import violations_glob
from .services.authz.policy_view import dev_jwks
from .services.policy import bundle_from_files
from .services.policy.feed import latest_valid
from .services.settings import WorkerSettings
from .validation_doc import write as write_validation_document

SYSTEM = "Enclave Gateway"
# The stage signature of each fact travels with it (services/fact_signatures.py): its message id,
# its signer's public key and the signature, null where the message carried none.
STREAM_SCHEMA = pa.schema([("seq", pa.int64()), ("subject", pa.string()), ("stored_at", pa.timestamp("us", "UTC")),
                           ("data", pa.binary()), ("msg_id", pa.string()), ("signer", pa.string()),
                           ("signature", pa.string())])


class _Collected(msgspec.Struct, kw_only=True):
    first: int = 0
    last: int = 0
    count: int = 0
    head: str = GENESIS
    checkpoints: list[AuditCheckpoint] = msgspec.field(default_factory=list)
    stored: list[tuple[int, str, bytes]] = msgspec.field(default_factory=list)
    activations: list[tuple[bytes, str, int]] = msgspec.field(default_factory=list)


async def export(settings: WorkerSettings, out: Path, period: str | None = None) -> pkg.Manifest:
    """Write the package for everything stored so far; refuses a folder that is not empty.

    `period` (YYYY, YYYY-MM or YYYY-MM-DD) restricts the analysts' tables, the violations feed and
    the validation document to those days; the stream and its chain are always exported whole.
    """
    tables.in_period(period)  # a bad period is refused before anything is written
    _prepare(out)
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        until = await wait_audited(nc, 120.0)  # the audit tables cover every exported message
        collected = await _write_stream(nc.jetstream(), out / pkg.STREAM, until)
    finally:
        await nc.close()
    _copy_audit(settings.audit_dir, out, collected.last, period)
    _write_tables(out, period)
    (out / pkg.CHECKPOINTS).write_bytes(msgspec.json.format(msgspec.json.encode(collected.checkpoints)))
    register = _write_register(settings, out, collected)
    summary = replay_summary(collected.stored, dev_jwks(settings), settings.policy_signers)
    (out / pkg.REPLAY).write_bytes(msgspec.json.format(msgspec.json.encode(summary)))
    oscal.write_validated(oscal.component_definition(register, oscal.now_utc()), out / oscal.COMPONENT_FILE)
    write_validation_document(out, period)
    return _sign_manifest(settings, out, collected, period)


def replay_summary(stored: list[tuple[int, str, bytes]], jwks: list[str],
                   trusted: dict[str, str] | None = None) -> pkg.ReplaySummary:
    """Replay every decision of the exported stream; the summary the package and its document carry."""
    result = replay(stored, jwks, trusted=trusted)
    return pkg.ReplaySummary(
        decisions=result.decisions, reproduced=result.reproduced, observations=result.observations,
        mismatches=[f"seq {m.seq} {m.decision} request {m.request_id}: {m.why}" for m in result.mismatches[:100]],
        policies_refused=result.policies_refused)


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)


async def _write_stream(js: JetStreamContext, path: Path, until: int) -> _Collected:
    got = _Collected()
    if until == 0:
        pq.write_table(STREAM_SCHEMA.empty_table(), path)
        return got
    rows: list[dict[str, object]] = []
    messages = bus.stored_between(js, subjects.ALL_EVENTS, "admin_evidence", 1, until)
    with pq.ParquetWriter(path, STREAM_SCHEMA) as writer, Progress(transient=True) as progress:
        task = progress.add_task("exporting the stream", total=until)
        async with contextlib.aclosing(messages) as msgs:
            async for msg in msgs:
                seq = msg.metadata.sequence.stream
                rows.append({"seq": seq, "subject": msg.subject, "stored_at": msg.metadata.timestamp,
                             "data": msg.data, **fact_signatures.as_columns(msg.headers)})
                _fold(got, seq, msg.subject, msg.data, bus.unsigned(js, msg.subject, msg.headers, msg.data) is None)
                if len(rows) >= 5000:
                    writer.write_table(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))
                    rows = []
                progress.update(task, completed=seq)
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))
    return got


def _fold(got: _Collected, seq: int, subject: str, data: bytes, signed: bool) -> None:
    got.first = got.first or seq
    got.last, got.count = seq, got.count + 1
    got.head = chain(got.head, seq, subject, hashlib.sha256(data).hexdigest())  # the chain covers every message
    if not signed:  # ...but only a fact its owner signed is replayed, or vouches for anything
        return
    got.stored.append((seq, subject, data))
    if subject == subjects.audit_checkpoint():
        with contextlib.suppress(codec.DecodeError):  # junk on the subject is chained, vouches for nothing
            got.checkpoints.append(codec.decode_as(data, AuditCheckpoint, subject))
    elif subject == subjects.policy_activated():
        got.activations.append((data, subject, seq))


def _copy_audit(audit_dir: Path, out: Path, until: int, period: str | None) -> None:
    """The audit tables up to the last exported event (the auditor may have written more since)."""
    if audit_dir.exists():
        shutil.copytree(audit_dir, out / pkg.AUDIT, ignore=shutil.ignore_patterns("*.tmp", "flush-*"))
    for path in sorted((out / pkg.AUDIT).glob("*/day=*/*.parquet")):
        table = pq.read_table(path)
        kept = table.filter(pc.less_equal(table.column("seq"), until))
        if kept.num_rows == 0:
            path.unlink()
        elif kept.num_rows < table.num_rows:
            pq.write_table(kept, path)
    con = duckdb.connect()
    try:
        if any((audit_dir / "violations").glob("day=*/*.parquet")):
            rel = f"(SELECT * FROM read_parquet('{violations_glob(audit_dir)}', hive_partitioning=false) " \
                  f"WHERE seq <= {int(until)} AND {tables.in_period(period)})"
            con.execute(f"COPY (SELECT * FROM {rel} ORDER BY seq) TO '{out / pkg.VIOLATIONS_CSV}' (HEADER)")
            con.execute(f"COPY (SELECT * FROM {rel} ORDER BY seq) TO '{out / pkg.VIOLATIONS_PARQUET}' (FORMAT parquet)")
        else:
            (out / pkg.VIOLATIONS_CSV).write_text("")
    finally:
        con.close()


def _write_tables(out: Path, period: str | None) -> None:
    """The analysts' tables, day-partitioned, from the package's own audit rows (one definition)."""
    if not any((out / pkg.AUDIT / "events").glob("day=*/*.parquet")):
        return
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{out / pkg.AUDIT}/events/day=*/*.parquet', "
                    "hive_partitioning=false, union_by_name=true)")
        tables.write(con, out / pkg.TABLES, period)
    finally:
        con.close()


def _write_register(settings: WorkerSettings, out: Path, got: _Collected) -> dict[str, Any]:
    register = register_of(settings, got.activations)
    (out / pkg.REGISTER).write_bytes(msgspec.json.format(msgspec.json.encode(register)))
    return register


def register_of(settings: WorkerSettings, activations: list[tuple[bytes, str, int]]) -> dict[str, Any]:
    """The register: the system, its keys, every policy activated and the catalog in force (the
    evidence package's register.json, and the console's register page)."""
    policies = msgspec.to_builtins(pkg.policy_history(activations))
    active = latest_valid(activations, settings.policy_signers)
    catalog = []
    if active is not None:
        catalog = pkg.catalog_entries(bundle_from_files(active.files))
    register = {
        "system": SYSTEM,
        "audit_signer": msgspec.to_builtins(keys.public_of(keys.load_private(settings.audit_key_file))),
        "policy_signers": settings.policy_signers,
        # every stage's pinned fact-signing key: verify and replay count a fact only with its owner's signature
        "fact_signers": fact_signers_of(settings),
        "policy_in_force": active.version if active else None,
        "policies": policies,
        "catalog": catalog,
        "token_issuers": msgspec.json.decode(active.files["issuers.jwks.json"]) if active else None,
        # the dev issuer's public keys when the deployment trusts it: replay verifies tokens with them
        "dev_token_issuer": msgspec.json.decode(jwks[0]) if (jwks := dev_jwks(settings)) else None,
    }
    return register


def fact_signers_of(settings: WorkerSettings) -> dict[str, str]:
    """Identity name -> the public key its facts are signed with (empty: a deployment without identities)."""
    pins = fact_signatures.load_pins(settings.creds_dir)
    return {} if pins is None else {name: key for key, name in pins.names.items()}


def _sign_manifest(settings: WorkerSettings, out: Path, got: _Collected, period: str | None) -> pkg.Manifest:
    manifest = pkg.Manifest(
        period=period,
        system=SYSTEM,
        exported_at=datetime.now(UTC).isoformat(),
        first_seq=got.first or 1,
        last_seq=got.last,
        events=got.count,
        chain_head=pkg.ChainHead(seq=got.last, head=got.head),
        files={name: pkg.file_entry(out / name) for name in pkg.listed_files(out)},
    )
    raw = msgspec.json.format(msgspec.json.encode(manifest))
    (out / pkg.MANIFEST).write_bytes(raw)
    key = keys.load_private(settings.audit_key_file)
    sig = pkg.ManifestSignature(kid=keys.public_of(key).kid, signature=keys.sign(key, pkg.signing_message(raw)))
    (out / pkg.MANIFEST_SIG).write_bytes(msgspec.json.encode(sig))
    return manifest
