"""A flush of the auditor is all its files or none, across a crash (issue 11's hostile review:
a crash between the renames of one flush's files left a hole `evidence verify` named for good)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.services.auditor import decider as auditor
from enclave_gateway.services.auditor import parquet_sink

from .samples import SAMPLES_BY_NAME

KEY = b"k" * 32
DAY_ONE = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC)


def _rows() -> list[auditor.AuditRow]:
    """Rows on two days, with a denial among them: one flush makes three files."""
    state = auditor.initial_state()
    rows = []
    for seq, name in enumerate(("RequestSubmitted", "RequestDenied", "RequestSubmitted", "BudgetSettled"), start=1):
        event = msgspec.structs.replace(SAMPLES_BY_NAME[name], occurred_at=DAY_ONE + timedelta(seconds=seq // 3))
        row, state = auditor.row_for(state, seq, subjects.for_event(event), codec.encode(event), DAY_ONE, KEY)
        rows.append(row)
    assert len({r.day for r in rows}) == 2
    return rows


def _seqs(audit_dir: Path, glob: str) -> list[int]:
    if not any(audit_dir.glob(glob)):
        return []
    con = duckdb.connect()
    try:
        return [int(r[0]) for r in con.execute(
            f"SELECT seq FROM read_parquet('{audit_dir / glob}', hive_partitioning=false) ORDER BY seq").fetchall()]
    finally:
        con.close()


def _crash_on_rename(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    real, calls = os.replace, [0]

    def replace(src: object, dst: object) -> None:
        calls[0] += 1
        if calls[0] == nth:
            raise SystemExit("power lost")  # as a kill -9 between two renames
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(parquet_sink.os, "replace", replace)


def test_a_crash_between_the_renames_of_a_committed_flush_is_finished_on_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows()
    _crash_on_rename(monkeypatch, 3)  # the manifest, the first day's events, then the crash
    with pytest.raises(SystemExit):
        parquet_sink.write_rows(tmp_path, rows)
    monkeypatch.undo()
    assert _seqs(tmp_path, "events/day=*/*.parquet") != [1, 2, 3, 4]  # a hole, as the review left it
    state = parquet_sink.resume_state(tmp_path)
    assert (state.seq, state.head) == (4, rows[-1].chain_hash)
    assert _seqs(tmp_path, "events/day=*/*.parquet") == [1, 2, 3, 4]
    assert _seqs(tmp_path, "violations/day=*/*.parquet") == [2]  # the denial reached the feed too
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob("flush-*"))


def test_a_crash_before_a_flush_commits_leaves_nothing_of_it_and_the_redelivery_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows()
    parquet_sink.write_rows(tmp_path, rows[:1])
    _crash_on_rename(monkeypatch, 1)  # the manifest's rename: the commit point, never reached
    with pytest.raises(SystemExit):
        parquet_sink.write_rows(tmp_path, rows[1:])
    monkeypatch.undo()
    state = parquet_sink.resume_state(tmp_path)
    assert state.seq == 1 and not list(tmp_path.glob("flush-*.json"))
    assert _seqs(tmp_path, "events/day=*/*.parquet") == [1]  # its staged files are read by no one
    parquet_sink.write_rows(tmp_path, rows[1:])  # the unacked messages come again
    assert _seqs(tmp_path, "events/day=*/*.parquet") == [1, 2, 3, 4]
    assert _seqs(tmp_path, "violations/day=*/*.parquet") == [2]


def test_a_manifest_naming_a_file_outside_the_audit_tables_is_refused_before_any_rename(tmp_path: Path) -> None:
    (tmp_path / "events" / "day=2026-11-25").mkdir(parents=True)
    kept = tmp_path / "events" / "day=2026-11-25" / "seq-000000000001-000000000001.parquet"
    kept.write_bytes(b"committed rows")
    (tmp_path / "events" / "day=2026-11-25" / "seq-000000000001-000000000001.tmp").write_bytes(b"other")
    (tmp_path / "flush-x.json").write_text('[["events/day=2026-11-25/seq-000000000001-000000000001.tmp", '
                                           '"events/day=2026-11-25/seq-000000000001-000000000001.parquet"], '
                                           '["../../x.tmp", "../../x.parquet"]]')
    with pytest.raises(ValueError, match="outside the audit tables"):
        parquet_sink.resume_state(tmp_path)
    assert kept.read_bytes() == b"committed rows"  # checked whole before the first rename


def test_a_garbage_manifest_stops_the_auditor_with_one_line_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "flush-x.json").write_text("{not json")
    with pytest.raises(ValueError, match="never acked: remove it"):
        parquet_sink.resume_state(tmp_path)


def test_a_committed_flush_that_lost_a_file_is_undone_whole_and_written_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut can leave a committed manifest naming a staged file that is gone: finished, the
    flush would leave a hole the resume skips for good. Nothing of it was acked, so it is undone."""
    rows = _rows()
    parquet_sink.write_rows(tmp_path, rows[:1])
    _crash_on_rename(monkeypatch, 2)  # committed, then the crash before the first rename
    with pytest.raises(SystemExit):
        parquet_sink.write_rows(tmp_path, rows[1:])
    monkeypatch.undo()
    next(tmp_path.glob("events/day=*/seq-000000000003-000000000004.tmp")).unlink()  # lost with the power
    state = parquet_sink.resume_state(tmp_path)
    assert state.seq == 1 and _seqs(tmp_path, "events/day=*/*.parquet") == [1]
    assert _seqs(tmp_path, "violations/day=*/*.parquet") == []
    parquet_sink.write_rows(tmp_path, rows[1:])  # the unacked messages come again
    assert _seqs(tmp_path, "events/day=*/*.parquet") == [1, 2, 3, 4]


def test_a_second_auditor_starting_mid_flush_leaves_the_first_ones_files_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a hostile review: a starting replica's recovery deleted every staged file, and the
    flush of the other went on to ack rows it never wrote."""
    rows, real, started = _rows(), os.replace, []

    def another_starts_then_commit(src: object, dst: object) -> None:
        if not started:  # once, just before the first writer's commit
            started.append(True)
            monkeypatch.setattr(parquet_sink.os, "replace", real)
            parquet_sink.resume_state(tmp_path)
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(parquet_sink.os, "replace", another_starts_then_commit)
    written = parquet_sink.write_rows(tmp_path, rows)
    assert all(p.exists() for p in written)
    assert _seqs(tmp_path, "events/day=*/*.parquet") == [1, 2, 3, 4]
