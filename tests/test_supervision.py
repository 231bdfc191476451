"""The supervisor's restart policy (issue 11 item 1); the faults it survives are in test_faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from enclave_gateway import procs
from enclave_gateway.supervision import (
    BEAT_S,
    FIRST_DELAY_S,
    HUNG_S,
    MAX_DELAY_S,
    STABLE_S,
    START_GRACE_S,
    Beats,
    Supervisor,
    beat,
    next_delay,
)


def test_backoff_doubles_for_a_crash_loop_and_starts_over_after_a_stable_run() -> None:
    delays = [FIRST_DELAY_S]
    for _ in range(12):
        delays.append(next_delay(delays[-1], ran_s=1.0))
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and delays[-1] == MAX_DELAY_S
    assert next_delay(MAX_DELAY_S, ran_s=STABLE_S) == FIRST_DELAY_S


def test_the_supervisor_restarts_a_dead_child_after_its_delay_and_counts_it(tmp_path: Path) -> None:
    said: list[str] = []
    sup = Supervisor(tmp_path / "supervisor.log", tmp_path / "counts.json", said.append)

    def start() -> subprocess.Popen[bytes]:
        return procs.spawn(["sleep", "60"], tmp_path / "child.log")

    first = start()
    sup.add("sleeper", start, first)
    first.kill()
    first.wait()
    sup.tick(now=time.monotonic())
    assert sup.children["sleeper"].proc is first and "exited with -9" in said[-1]  # not yet: its delay runs
    sup.tick(now=time.monotonic() + 1.0)
    child = sup.children["sleeper"]
    try:
        assert child.proc is not first and child.proc is not None and child.proc.poll() is None
        counts = json.loads((tmp_path / "counts.json").read_text())
        assert counts["sleeper"]["restarts"] == 1 and counts["sleeper"]["last_exit"] == -9
        assert "restarted" in (tmp_path / "supervisor.log").read_text()
    finally:
        assert child.proc is not None
        child.proc.kill()
        child.proc.wait()


def test_the_wait_before_a_restart_is_decided_by_how_long_the_dead_instance_ran(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "supervisor.log", tmp_path / "counts.json", lambda line: None)

    def start() -> subprocess.Popen[bytes]:
        return procs.spawn(["sleep", "60"], tmp_path / "child.log")

    sup.add("sleeper", start, start())
    child = sup.children["sleeper"]
    waits = []
    try:
        for ran_s in (1.0, 1.0, STABLE_S + 1.0):  # two quick crashes, then one after a long run
            assert child.proc is not None
            child.proc.kill()
            child.proc.wait()
            seen = child.started + ran_s
            sup.tick(now=seen)
            assert child.due is not None
            waits.append(child.due - seen)
            sup.tick(now=child.due)
        assert waits == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, FIRST_DELAY_S]
        assert oct((tmp_path / "counts.json").stat().st_mode & 0o777) == "0o640"
    finally:
        if child.proc is not None:
            child.proc.kill()
            child.proc.wait()


def _beating_child(tmp_path: Path) -> tuple[Supervisor, list[str], Beats, int]:
    """A supervised `sleep` that never writes into its pipe; the test writes for it (the write end)."""
    said: list[str] = []
    beats = Beats()
    sup = Supervisor(tmp_path / "supervisor.log", tmp_path / "counts.json", said.append, beats)
    ends: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        ends.append(beats.open("sleeper"))
        return procs.spawn(["sleep", "60"], tmp_path / "child.log")

    sup.add("sleeper", start, start(), beating=True)
    return sup, said, beats, ends[-1]


def test_a_worker_alive_but_silent_past_hung_s_is_killed_and_restarted(tmp_path: Path) -> None:
    """Issue 11 item 1's rest: a stopped or blocked worker is never seen dead, so its silence is the
    sign. Within its start grace, or while it writes, it is left alone."""
    sup, said, beats, write = _beating_child(tmp_path)
    child = sup.children["sleeper"]
    first = child.proc
    assert first is not None
    try:
        sup.tick(now=child.started + HUNG_S + 1.0)  # silent, but still in its start grace
        assert child.proc is first and first.poll() is None
        os.write(write, b".")
        sup.tick(now=child.started + START_GRACE_S + 1.0)  # past the grace, and it wrote: alive
        assert first.poll() is None
        later = child.started + START_GRACE_S + HUNG_S + 2.0  # silent since then
        sup.tick(now=later)
        assert first.wait(5) == -9 and any("hung" in line for line in said), said
        for step in range(1, 4):  # seen dead, restarted after its delay, like any death
            if child.proc is first:  # (no tick after: the synthetic clock would judge the new one)
                sup.tick(now=later + step)
        assert child.proc is not first and child.proc is not None and child.proc.poll() is None
        counts = json.loads((tmp_path / "counts.json").read_text())
        assert counts["sleeper"]["hung_kills"] == 1 and counts["sleeper"]["restarts"] == 1
    finally:
        os.close(write)
        beats.close_all()
        for proc in (first, child.proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_worker_event_loop_writes_its_beat_and_a_full_pipe_never_blocks_it() -> None:
    beats = Beats()
    write = beats.open("w")

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(beat(write))
        await asyncio.sleep(seconds)
        task.cancel()

    try:
        asyncio.run(run_for(BEAT_S * 1.5))
        now = time.monotonic()
        assert beats.silent_for("w", now) == 0.0  # heard
        assert beats.silent_for("w", now + 5.0) == 5.0  # nothing since
        os.set_blocking(write, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write, b"." * 65536)  # the supervisor away: the pipe fills up
        asyncio.run(asyncio.wait_for(run_for(BEAT_S * 1.5), 10))  # the loop still runs its beats
    finally:
        os.close(write)
        beats.close_all()
