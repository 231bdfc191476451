"""`gateway replay`: re-run every recorded decision from the live stream or an evidence package."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .replay import package as pkg
from .replay.engine import Result, Stored, diff, replay
from .replay.verify import SIGNATURE_FIELDS
from .runtime import reachable_settings
from .schemas import codec, subjects
from .services import bus, fact_signatures
from .services.authz.policy_view import dev_jwks
from .services.settings import WorkerSettings


def from_stream(data_dir: Path) -> tuple[list[Stored], list[str], dict[str, str]]:
    """Every stored message of the data dir's stream, the dev issuer's keys when it is trusted, the pins."""
    with reachable_settings(data_dir) as settings:
        return _read(settings), dev_jwks(settings), settings.policy_signers


def _read(settings: WorkerSettings) -> list[Stored]:
    async def read() -> list[Stored]:
        nc = await bus.connect(settings, "admin", keep_trying=False)
        try:
            return [(seq, subject, data) for data, subject, seq in
                    await bus.stored_on(nc.jetstream(), subjects.ALL_EVENTS, "admin")]
        finally:
            await nc.close()

    return asyncio.run(read())


def from_package(root: Path) -> tuple[list[Stored], list[str], dict[str, str]]:
    """The exported stream of an evidence package (verify it first), and the dev issuer it recorded."""
    register = json.loads((root / pkg.REGISTER).read_text())
    stored = signed_rows(root, dict(register.get("fact_signers") or {}))
    dev = register.get("dev_token_issuer")
    return stored, [json.dumps(dev)] if dev else [], dict(register.get("policy_signers") or {})


def signed_rows(root: Path, fact_signers: dict[str, str]) -> list[Stored]:
    """The package's stored facts that their owner signed (every one, in a package made before
    facts were signed); a fact no owner signed is left out, as every worker left it out."""
    names = set(pq.ParquetFile(root / pkg.STREAM).schema_arrow.names)
    signed = fact_signers and set(SIGNATURE_FIELDS) <= names
    columns = ["seq", "subject", "data", *(SIGNATURE_FIELDS if signed else ())]
    table = pq.read_table(root / pkg.STREAM, columns=columns)
    rows = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    if not signed:
        return [(seq, subject, data) for seq, subject, data in rows]
    pins = fact_signatures.Pins.of(fact_signers)
    out: list[Stored] = []
    for seq, subject, data, *signature in rows:
        try:
            pins.owner(subject, fact_signatures.from_columns(signature), data)
        except codec.UnsignedFact:
            continue
        out.append((seq, subject, data))
    return out


def run(console: Console, stored: list[Stored], jwks: list[str], trusted: dict[str, str], first: int,
        last: int | None, show: int, data_dir: Path | None = None) -> int:
    """Replay with a progress bar, print the result and the first mismatches; the exit code. With
    `data_dir`, the outcome is kept there too (the console's evidence page shows the last one)."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("re-deciding", total=len(stored))
        result = replay(stored, jwks, first, last, lambda n: progress.update(task, completed=n), trusted)
    report(console, result, show)
    if data_dir is not None:
        save_last(data_dir, result, stored)
    return 0 if result.ok else 1


LAST = Path("replay") / "last.json"


class LastReplay(msgspec.Struct, kw_only=True):
    """The outcome of the last replay of a data dir's stream."""

    at: str
    messages: int
    first_seq: int
    last_seq: int
    decisions: int
    reproduced: int
    mismatches: int
    ok: bool


def save_last(data_dir: Path, result: Result, stored: list[Stored]) -> LastReplay:
    """Keep a replay's outcome in the data dir."""
    last = LastReplay(at=datetime.now(UTC).isoformat(timespec="seconds"), messages=len(stored),
                      first_seq=stored[0][0] if stored else 0, last_seq=stored[-1][0] if stored else 0,
                      decisions=result.decisions, reproduced=result.reproduced,
                      mismatches=len(result.mismatches), ok=result.ok)
    path = data_dir / LAST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.encode(last))
    return last


def load_last(data_dir: Path) -> LastReplay | None:
    """The last replay's outcome, if one was kept."""
    try:
        return msgspec.json.decode((data_dir / LAST).read_bytes(), type=LastReplay)
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def report(console: Console, result: Result, show: int) -> None:
    """Counts, then each of the first `show` mismatches with the fields that differ."""
    share = 100.0 * result.reproduced / result.decisions if result.decisions else 100.0
    colour = "green" if result.ok else "red"
    console.print(f"[{colour}]{result.reproduced} of {result.decisions} decisions reproduced ({share:.2f}%)[/], "
                  f"{len(result.mismatches)} mismatch(es); {result.observations} observations recorded, not "
                  "re-decided")
    for line in result.policies_refused:
        console.print(f"[yellow]recorded policy not replayable:[/] {line}")
    for m in result.mismatches[:show]:
        table = Table(title=f"seq {m.seq} {m.decision} for request {m.request_id}: {m.why}")
        for col in ("field", "recorded", "replayed"):
            table.add_column(col, overflow="fold")
        for row in diff(m):
            table.add_row(*row)
        console.print(table)
