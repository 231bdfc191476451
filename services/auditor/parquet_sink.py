"""Day-partitioned Parquet files of audit rows: `audit/events/day=YYYY-MM-DD/seq-<first>-<last>.parquet`.

A file is written whole (temp name, then rename) before its messages are acked, so a crash
leaves either a complete file or a redelivery; rows at or below the last written seq are skipped.
"""

from __future__ import annotations

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


def write_rows(audit_dir: Path, rows: list[AuditRow]) -> list[Path]:
    """Write rows into one events file per day, and denials into the violations table too."""
    written = _write(audit_dir / "events", rows, SCHEMA)
    denials = [r for r in rows if r.type == "RequestDenied"]
    return written + _write(audit_dir / "violations", denials, VIOLATION_SCHEMA)


def _write(root: Path, rows: list[AuditRow], schema: pa.Schema) -> list[Path]:
    by_day: dict[str, list[AuditRow]] = defaultdict(list)
    for row in rows:
        by_day[row.day].append(row)
    written = []
    for day, day_rows in by_day.items():
        folder = root / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"seq-{day_rows[0].seq:012d}-{day_rows[-1].seq:012d}.parquet"
        records = msgspec.to_builtins(day_rows, builtin_types=(datetime,))
        table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in records], schema=schema)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)  # the rename itself must survive a crash before the auditor acks (issue 9)
        written.append(path)
    return written


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_state(audit_dir: Path) -> AuditorState:
    """The chain head recorded in the newest row, so a restarted auditor continues the chain."""
    if not any((audit_dir / "events").glob("day=*/*.parquet")):
        return AuditorState()
    con = duckdb.connect()
    row = con.execute(
        f"SELECT seq, chain_hash FROM read_parquet('{events_glob(audit_dir)}', hive_partitioning=false) "
        "ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    con.close()
    return AuditorState() if row is None else AuditorState(seq=int(row[0]), head=str(row[1]))
