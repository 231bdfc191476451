"""The supervisor's restart policy (issue 11 item 1); the faults it survives are in test_faults."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from enclave_gateway import procs
from enclave_gateway.supervision import FIRST_DELAY_S, MAX_DELAY_S, STABLE_S, Supervisor, next_delay


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
