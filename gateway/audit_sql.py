"""DuckDB over the Parquet audit: the `events` view every query starts from."""

from __future__ import annotations

from pathlib import Path

import duckdb

from .replay import tables
from .services.auditor.parquet_sink import events_glob


def connect(audit_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with `events` over every audit file (empty, typed, when none exist yet)."""
    con = duckdb.connect()
    if any((audit_dir / "events").glob("day=*/*.parquet")):
        con.execute(
            f"CREATE VIEW events AS SELECT * FROM read_parquet('{events_glob(audit_dir)}', "
            "hive_partitioning=false, union_by_name=true)"
        )
        tables.create_views(con)  # requests, decisions, invocations, spend, checkpoints, policies
    else:
        con.execute("CREATE VIEW events AS SELECT NULL::BIGINT AS seq, NULL::VARCHAR AS type WHERE false")
    return con


def query(audit_dir: Path, sql: str, params: list[object] | None = None) -> tuple[list[str], list[tuple[object, ...]]]:
    """Column names and rows of one query (`params` bound to its `?`s: never pasted into the SQL)."""
    con = connect(audit_dir)
    try:
        rel = con.execute(sql, params or [])
        cols = [d[0] for d in rel.description or []]
        return cols, rel.fetchall()
    finally:
        con.close()
