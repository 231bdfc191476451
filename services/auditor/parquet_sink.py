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

import json
import os
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from .decider import AuditorState, AuditRow

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


FLUSH_MANIFEST = "flush.json"  # in the audit dir while a committed flush's files are being renamed


def write_rows(audit_dir: Path, rows: list[AuditRow]) -> list[Path]:
    """Write rows into one events file per day, and denials into the violations table too; all of
    them, or (after a crash, once `recover` has run) none."""
    denials = [r for r in rows if r.type == "RequestDenied"]
    staged = _stage(audit_dir / "events", rows, SCHEMA) + _stage(audit_dir / "violations", denials, VIOLATION_SCHEMA)
    manifest = audit_dir / FLUSH_MANIFEST
    pending = manifest.with_suffix(".tmp")
    pending.write_text(json.dumps([[str(tmp.relative_to(audit_dir)), str(path.relative_to(audit_dir))]
                                   for tmp, path in staged]))
    _fsync(pending)
    os.replace(pending, manifest)  # the commit point
    _fsync(audit_dir)
    _finish(manifest)
    return [path for _, path in staged]


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


def _finish(manifest: Path) -> None:
    """Every rename a committed flush names (those done already are skipped), then the manifest goes."""
    for tmp_name, path_name in json.loads(manifest.read_text()):
        tmp, path = manifest.parent / tmp_name, manifest.parent / path_name
        if not (_inside(tmp, manifest.parent) and _inside(path, manifest.parent)):
            raise ValueError(f"{manifest} names a file outside the audit folder: {tmp_name!r} -> {path_name!r}")
        if tmp.exists():
            os.replace(tmp, path)
            _fsync(path.parent)  # the rename itself must survive a crash before the auditor acks (issue 9)
    manifest.unlink()
    _fsync(manifest.parent)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def recover(audit_dir: Path) -> None:
    """After a crash: finish the committed flush, drop the files of one never committed."""
    manifest = audit_dir / FLUSH_MANIFEST
    if manifest.exists():
        _finish(manifest)
    manifest.with_suffix(".tmp").unlink(missing_ok=True)
    for table in ("events", "violations"):
        for stray in (audit_dir / table).glob("day=*/*.tmp"):
            stray.unlink()


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
