"""The violations feed: the Parquet table for assessors, and the live NATS subject for a SOC."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import msgspec
from nats.aio.msg import Msg
from rich.table import Table

from .schemas import codec
from .services import bus
from .services.auditor.parquet_sink import VIOLATION_COLUMNS, violations_glob
from .supervisor import read_settings

LIVE_SUBJECT = "gw.evt.request.denied.>"  # what a SOC tool subscribes to (user `soc`)


def list_violations(
    audit_dir: Path, since: str | None = None, rule: str | None = None, team: str | None = None
) -> tuple[list[str], list[tuple[object, ...]]]:
    """Denials, oldest first, optionally from `since` (ISO date/time, UTC), for one rule, one team."""
    cols = [
        "occurred_at",
        "caller",
        "team",
        "rule",
        "reason",
        "model",
        "clearance",
        "input_label",
        "output_label",
        "policy_version",
        "request_id",
    ]
    if not any((audit_dir / "violations").glob("day=*/*.parquet")):
        return cols, []
    where, params = ["true"], []
    if since:
        where.append("occurred_at >= ?::TIMESTAMPTZ")
        when = datetime.fromisoformat(since)  # a time without an offset is UTC; any offset is honoured
        params.append((when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC).isoformat())
    if rule:
        where.append("rule = ?")
        params.append(rule)
    if team:
        where.append("team = ?")
        params.append(team)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        sql = (
            f"SELECT {', '.join(cols)} FROM read_parquet('{violations_glob(audit_dir)}', union_by_name=true) "
            f"WHERE {' AND '.join(where)} ORDER BY seq"
        )
        return cols, con.execute(sql, params).fetchall()
    finally:
        con.close()


def violations_table(rows: list[tuple[object, ...]]) -> Table:
    """The rows of `list_violations` as a terminal table: who, which rule, which labels."""
    table = Table(title=f"Violations ({len(rows)})")
    for col in ("time (UTC)", "caller", "team", "rule", "model", "input -> output"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r[0])[:19], str(r[1] or "-"), str(r[2] or "-"), str(r[3]), str(r[5]), f"{r[7] or '-'} -> {r[8] or '-'}"
        )
    return table


def follow(data_dir: Path) -> int:
    """Print every new denial as a JSON line until Ctrl-C, as the SOC user."""

    async def run() -> None:
        settings = read_settings(data_dir)
        nc = await bus.connect(settings, "soc")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def show(msg: Msg) -> None:
            try:
                bus.owner_of(nc.jetstream(), msg.subject, msg.headers, msg.data)  # only authz's own denials
                denied = codec.decode_event(msg.data, msg.subject)
            except codec.DecodeError as exc:  # bytes a credential made the server store: said, never obeyed
                print(f"skipped a message on {msg.subject} that is no denial: {exc}", file=sys.stderr, flush=True)
                return
            data = msgspec.to_builtins(denied)
            print(
                json.dumps(
                    {
                        k: data.get(k)
                        for k in ("occurred_at", "rule", "reason", "model", "input_label", "output_label", "request_id")
                    }
                ),
                flush=True,
            )

        await nc.subscribe(LIVE_SUBJECT, cb=show)
        await stop.wait()
        await nc.close()

    asyncio.run(run())
    return 0


__all__ = ["LIVE_SUBJECT", "VIOLATION_COLUMNS", "follow", "list_violations"]
