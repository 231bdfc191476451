"""Day-partitioned Parquet files of audit rows: `audit/events/day=YYYY-MM-DD/seq-<first>-<last>.parquet`.

A flush is written whole before its messages are acked, so a crash leaves either the whole flush
or a redelivery; rows at or below the last written seq are skipped. A flush may be several files
(one per day its rows fall on, and the violations beside the events), so it commits like a small
write-ahead log: every file under a temporary name, then a manifest of the renames (itself
renamed into place: the commit point), then the renames, then the manifest removed. A restarted
auditor finishes a committed flush's renames and drops an uncommitted one's files, whose messages
were never acked and come again. Renaming file by file, a crash between two renames left some
rows on disk and others not, and the resume, which trusts the newest row, never wrote the rest
(a hostile review's hole; `evidence verify` named it for good).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from .decider import AuditorState, AuditRow

log = logging.getLogger("enclave_gateway.auditor")

SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("subject", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("day", pa.string()),
        ("policy_version", pa.string()),
        ("team", pa.string()),
        ("period", pa.string()),
        ("caller", pa.string()),
        ("model", pa.string()),
        ("model_id", pa.string()),
        ("endpoint", pa.string()),
        ("reason", pa.string()),
        ("rule", pa.string()),
        ("detail", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("amount_micros", pa.int64()),
        ("charged_micros", pa.int64()),
        ("spent_micros", pa.int64()),
        ("reserved_micros", pa.int64()),
        ("cap_micros", pa.int64()),
        ("remaining_micros", pa.int64()),
        ("latency_ms", pa.float64()),
        ("outcome", pa.string()),
        ("input_label", pa.string()),
        ("output_label", pa.string()),
        ("clearance", pa.string()),
        ("prompt_hmac", pa.string()),
        ("completion_hmac", pa.string()),
        ("data_sha256", pa.string()),
        ("chain_hash", pa.string()),
    ]
)


# The violations feed an assessor queries: one row per denial, with the rule that fired.
VIOLATION_COLUMNS = (
    "seq",
    "occurred_at",
    "day",
    "request_id",
    "caller",
    "team",
    "rule",
    "reason",
    "detail",
    "model",
    "clearance",
    "input_label",
    "output_label",
    "policy_version",
)
VIOLATION_SCHEMA = pa.schema([SCHEMA.field(c) for c in VIOLATION_COLUMNS])


def events_glob(audit_dir: Path) -> str:
    """The glob DuckDB reads the events table from."""
    return str(audit_dir / "events" / "day=*" / "*.parquet")


def violations_glob(audit_dir: Path) -> str:
    """The glob DuckDB reads the violations table from."""
    return str(audit_dir / "violations" / "day=*" / "*.parquet")


MANIFESTS = "flush-*.json"  # in the audit dir while a committed flush's files are being renamed
TABLES = ("events", "violations")


def write_rows(audit_dir: Path, rows: list[AuditRow]) -> list[Path]:
    """Write rows into one events file per day, and denials into the violations table too; all of
    them, or (after a crash, once `recover` has run) none. Returns only once every file is in place."""
    denials = [r for r in rows if r.type == "RequestDenied"]
    staged = _stage(audit_dir / "events", rows, SCHEMA) + _stage(audit_dir / "violations", denials, VIOLATION_SCHEMA)
    for folder in {p for tmp, _ in staged for p in (tmp.parent, tmp.parent.parent)} | {audit_dir}:
        _fsync(folder)  # each staged file, and a new day's folder, is found after a power loss
    # one name per flush: two writers on one folder never commit each other's list
    name = f"flush-{rows[0].seq:012d}-{rows[-1].seq:012d}-{uuid.uuid4().hex}"
    pending, manifest = audit_dir / f"{name}.pending", audit_dir / f"{name}.json"
    pending.write_text(json.dumps([[str(t.relative_to(audit_dir)), str(f.relative_to(audit_dir))] for t, f in staged]))
    _fsync(pending)
    os.replace(pending, manifest)  # the commit point
    _fsync(audit_dir)
    _finish(manifest, _entries(manifest))
    missing = [str(f) for _, f in staged if not f.exists()]
    if missing:  # never acked: its messages come again
        raise OSError(f"audit files missing after their flush: {missing}")
    return [f for _, f in staged]


def _stage(root: Path, rows: list[AuditRow], schema: pa.Schema) -> list[tuple[Path, Path]]:
    """Each day's rows written and synced under a temporary name: (temporary, final) paths."""
    by_day: dict[str, list[AuditRow]] = defaultdict(list)
    for row in rows:
        by_day[row.day].append(row)
    staged = []
    for day, day_rows in by_day.items():
        folder = root / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"seq-{day_rows[0].seq:012d}-{day_rows[-1].seq:012d}.parquet"
        records = msgspec.to_builtins(day_rows, builtin_types=(datetime,))
        table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in records], schema=schema)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        _fsync(tmp)
        staged.append((tmp, path))
    return staged


def _entries(manifest: Path) -> list[tuple[Path, Path]]:
    """The renames a manifest names, every one checked before any is done: a temporary file and its
    final name, in one day folder of one table, inside the audit folder."""
    audit_dir = manifest.parent
    try:
        pairs = msgspec.json.decode(manifest.read_bytes(), type=list[tuple[str, str]])
    except msgspec.DecodeError as exc:
        raise ValueError(f"{manifest} is not a flush manifest ({exc}); its flush was never acked: "
                         "remove it and the files it names, and the auditor writes them again") from exc
    entries = []
    for tmp_name, final_name in pairs:
        tmp, final = audit_dir / tmp_name, audit_dir / final_name
        parts = Path(final_name).parts
        if (len(parts) != 3 or parts[0] not in TABLES or not parts[1].startswith("day=")
                or final.suffix != ".parquet" or tmp != final.with_suffix(".tmp")
                or not final.resolve().is_relative_to(audit_dir.resolve())):
            raise ValueError(f"{manifest} names a file outside the audit tables: {tmp_name!r} -> {final_name!r}")
        entries.append((tmp, final))
    return entries


def _finish(manifest: Path, entries: list[tuple[Path, Path]]) -> None:
    """Every rename a committed flush names, then the manifest goes. A file with neither name (lost
    in a power cut, or removed) means its rows are not on disk: the whole flush is undone instead,
    which is safe since nothing of it was acked (the ack follows the manifest's removal)."""
    if any(not tmp.exists() and not final.exists() for tmp, final in entries):
        log.warning("audit flush %s lost a file: undone, its messages come again", manifest.name)
        for tmp, final in entries:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
    else:
        for tmp, final in entries:
            with contextlib.suppress(FileNotFoundError):  # renamed already (before a crash, or by its writer)
                os.replace(tmp, final)
    for folder in {final.parent for _, final in entries}:
        _fsync(folder)  # the renames must survive a crash before the auditor acks
    manifest.unlink(missing_ok=True)
    _fsync(manifest.parent)


def recover(audit_dir: Path) -> None:
    """After a crash: finish each committed flush (or undo one that lost a file). A flush never
    committed left only temporary files, which no reader globs; its messages come again."""
    for manifest in sorted(audit_dir.glob(MANIFESTS)):
        _finish(manifest, _entries(manifest))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_state(audit_dir: Path) -> AuditorState:
    """The chain head recorded in the newest row, so a restarted auditor continues the chain."""
    if audit_dir.is_dir():
        recover(audit_dir)
    if not any((audit_dir / "events").glob("day=*/*.parquet")):
        return AuditorState()
    con = duckdb.connect()
    row = con.execute(
        f"SELECT seq, chain_hash FROM read_parquet('{events_glob(audit_dir)}', hive_partitioning=false) "
        "ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    con.close()
    return AuditorState() if row is None else AuditorState(seq=int(row[0]), head=str(row[1]))
