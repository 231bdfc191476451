"""The audit tables analysts and assessors query (issue 9 item 4), each defined once as SQL over the
auditor's `events` rows: `gateway sql` serves them as views, the evidence package carries them as
day-partitioned Parquet, and `evidence verify` derives them again from the verified rows.

Their columns are part of the public contract (docs/architecture.md lists them): add, never rename.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

PERIOD = re.compile(r"^\d{4}(-\d{2}){0,2}$")  # 2026, 2026-11 or 2026-11-28: a prefix of the `day` column


def in_period(period: str | None) -> str:
    """The SQL predicate on `day` for a period (TRUE without one); raises ValueError on a bad period."""
    if period is None:
        return "TRUE"
    if not PERIOD.match(period):
        raise ValueError(f"period {period!r} is not YYYY, YYYY-MM or YYYY-MM-DD")
    return f"day LIKE '{period}%'"

TABLES: dict[str, str] = {
    "requests": (
        "SELECT seq, day, occurred_at, request_id, model, policy_version, prompt_hmac "
        "FROM events WHERE type = 'RequestSubmitted'"
    ),
    "decisions": (
        "SELECT seq, day, occurred_at, request_id, type AS decision, caller, team, model, model_id, rule, reason, "
        "clearance, input_label, output_label, policy_version FROM events "
        "WHERE type IN ('RequestAuthorized', 'RequestDenied', 'BudgetReserved', 'BudgetRejected', 'RouteSelected', "
        "'RouteUnavailable')"
    ),
    "invocations": (
        "SELECT seq, day, occurred_at, request_id, team, model_id, endpoint, type AS outcome, reason AS error, "
        "prompt_tokens, completion_tokens, latency_ms, completion_hmac FROM events "
        "WHERE type IN ('InvocationCompleted', 'InvocationFailed')"
    ),
    "spend": (
        "SELECT seq, day, occurred_at, request_id, team, period, model_id, amount_micros AS reserved_micros, "
        "charged_micros, prompt_tokens, completion_tokens, spent_micros, cap_micros, policy_version "
        "FROM events WHERE type = 'BudgetSettled'"
    ),
    "violations": (
        "SELECT seq, day, occurred_at, request_id, caller, team, rule, reason, model, clearance, input_label, "
        "output_label, policy_version FROM events WHERE type = 'RequestDenied'"
    ),
    "checkpoints": (
        "SELECT seq, day, occurred_at, caller AS signer, detail FROM events WHERE type = 'AuditCheckpoint'"
    ),
    "policies": (
        "SELECT seq, day, occurred_at, caller AS activated_by, policy_version AS version, detail FROM events "
        "WHERE type = 'PolicyActivated'"
    ),
}


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    """Every table as a view over `events` (which must exist)."""
    for name, sql in TABLES.items():
        if name != "violations":  # the auditor writes that one itself; the same rows
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def write(con: duckdb.DuckDBPyConnection, out: Path, period: str | None = None) -> list[str]:
    """Each table, restricted to the period, as day-partitioned Parquet under `out/<name>/day=…/`."""
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for name, base in TABLES.items():
        sql = f"SELECT * FROM ({base}) WHERE {in_period(period)}"
        target = out / name
        if con.execute(f"SELECT count(*) FROM ({sql})").fetchone() == (0,):
            continue
        con.execute(f"COPY ({sql} ORDER BY seq) TO '{target}' (FORMAT parquet, PARTITION_BY (day), "
                    "OVERWRITE_OR_IGNORE true)")
        written.append(name)
    return written


def differs(con: duckdb.DuckDBPyConnection, name: str, folder: Path, period: str | None = None) -> int:
    """Rows in either the stored table or the table derived from `events` for the period, but not both."""
    stored = f"(SELECT * FROM read_parquet('{folder}/*/*.parquet', hive_partitioning=false))"  # day: the folder
    derived = f"(SELECT * EXCLUDE (day) FROM ({TABLES[name]}) WHERE {in_period(period)})"
    row = con.execute(f"SELECT (SELECT count(*) FROM ({stored} EXCEPT ALL {derived})) + "
                      f"(SELECT count(*) FROM ({derived} EXCEPT ALL {stored}))").fetchone()
    return int(row[0]) if row else 0
