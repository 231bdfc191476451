"""Keep `gateway up`'s children alive (issue 11 item 1): a worker, model server or broker that
dies is started again with backoff, the event is logged and counted, and the gateway stops only
when it is told to.

Why restart rather than stop: every stage is a JetStream consumer, so a restarted worker takes up
what its predecessor left unacked, and a restarted broker recovers its store; stopping the whole
gateway instead turned one crash into an outage whose in-flight requests ran after a manual start.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # a child that ran this long starts its backoff over: it crashed anew, not again
# A worker alive but hung (stopped, or its event loop blocked) answers nothing and is never seen
# dead. Its loop writes a byte into a pipe every BEAT_S; one silent for HUNG_S is killed and
# restarted. A worker busy with a long model call still beats: only a loop that stopped running
# is silent. A pipe, not a file: no disk, no wall clock and no file system's clock to be wrong
# (a review found each of them could kill healthy workers), and it closes when the worker dies.
BEAT_S = 1.0
HUNG_S = 30.0
START_GRACE_S = 60.0  # imports, connecting and reading its state come before the first turn counts
REAP_WARN_S = 10.0  # a killed worker still not gone (stuck in the kernel) is said, once


async def beat(fd: int) -> None:
    """Write a byte into the supervisor's pipe every BEAT_S while this event loop runs."""
    os.set_blocking(fd, False)  # never block the loop: a full pipe means the supervisor reads later
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass
        except OSError:  # no supervisor reads it any more
            return
        await asyncio.sleep(BEAT_S)


class Beats:
    """Each worker's sign-of-life pipe: the read end kept here, when it was last heard (monotonic)."""

    def __init__(self) -> None:
        self.readers: dict[str, int] = {}
        self.heard: dict[str, float] = {}

    def open(self, name: str) -> int:
        """A new pipe for a worker about to start (its predecessor's is closed); the write end, for it."""
        self.close(name)
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.readers[name], self.heard[name] = read, time.monotonic()
        return write

    def silent_for(self, name: str, now: float) -> float | None:
        """Seconds since the worker last wrote, as of `now` (None: it has no pipe)."""
        read = self.readers.get(name)
        if read is None:
            return None
        try:
            while os.read(read, 4096):  # b"": the worker closed it (exited); its death is seen by poll
                self.heard[name] = now
        except BlockingIOError:
            pass
        return max(0.0, now - self.heard[name])

    def close(self, name: str) -> None:
        read = self.readers.pop(name, None)
        if read is not None:
            os.close(read)

    def close_all(self) -> None:
        for name in list(self.readers):
            self.close(name)


def next_delay(delay_s: float, ran_s: float) -> float:
    """How long to wait before the next start: doubled each quick crash, reset once a child ran
    for STABLE_S (a crash loop must not hammer the broker or a GPU model server)."""
    if ran_s >= STABLE_S:
        return FIRST_DELAY_S
    return min(MAX_DELAY_S, delay_s * 2)


@dataclass
class Child:
    """One supervised process and its restart record."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None
    started: float = field(default_factory=time.monotonic)
    delay_s: float = FIRST_DELAY_S
    due: float | None = None  # when its next start is due, once it was seen dead
    restarts: int = 0
    last_exit: int | None = None
    last_restart: str | None = None
    beating: bool = False  # a worker with a sign-of-life pipe (the broker and model servers: seen by exit only)
    hung_s: float = HUNG_S
    hung_kills: int = 0
    killed_at: float | None = None  # killed as hung, not yet reaped


class Supervisor:
    """Polled by `gateway up` (tick); children are restarted in the order they were added, so a
    dead broker comes back before the workers that reconnect to it."""

    def __init__(self, log_path: Path, counts_path: Path, say: Callable[[str], None],
                 beats: Beats | None = None) -> None:
        self.log_path, self.counts_path, self.say = log_path, counts_path, say
        self.children: dict[str, Child] = {}
        self.beats = beats

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]],
            proc: subprocess.Popen[bytes] | None, beating: bool = False) -> None:
        """Supervise `proc`; `start` makes its replacement; `beating`: it writes into its pipe in `beats`."""
        self.children[name] = Child(name, start, proc, beating=beating)

    def tick(self, now: float | None = None) -> None:
        """Notice what died and start what is due; never raises (a failed start is retried later)."""
        now = time.monotonic() if now is None else now
        for child in self.children.values():
            code = child.proc.poll() if child.proc is not None else child.last_exit
            if code is None and child.proc is not None and child.due is None:
                code = self._kill_if_hung(child, now)
            if code is None:
                continue
            if child.due is None:  # just seen dead: how long this instance ran decides the wait
                child.delay_s = next_delay(child.delay_s, now - child.started) if child.restarts else child.delay_s
                child.last_exit, child.due = code, now + child.delay_s
                self._note(f"{child.name} exited with {code}; restarting in {child.delay_s:g} s")
            if now < child.due:
                continue
            child.restarts += 1
            child.last_restart = datetime.now(UTC).isoformat()
            try:
                child.proc = child.start()
            except Exception as exc:  # the broker's port still held, a model that will not load: later
                child.proc = None
                child.delay_s = min(MAX_DELAY_S, child.delay_s * 2)
                child.due = now + child.delay_s
                self._note(f"{child.name} did not start ({exc}); next try in {child.delay_s:g} s")
                continue
            child.started, child.due, child.killed_at = time.monotonic(), None, None
            self._note(f"{child.name} restarted (restart {child.restarts})")
        try:
            self._write_counts()
        except OSError as exc:  # a full disk must not stop the gateway: the counts are for metrics
            self.say(f"could not write {self.counts_path}: {exc}")

    def _kill_if_hung(self, child: Child, now: float) -> int | None:
        """Kill a worker silent for its `hung_s` (past START_GRACE_S): its exit code if already reaped."""
        assert child.proc is not None
        if child.killed_at is not None:  # killed already: reaped by a later poll, said if it lingers
            if now - child.killed_at >= REAP_WARN_S:
                self._note(f"{child.name} was killed {now - child.killed_at:.0f} s ago and has not exited")
                child.killed_at = now
            return None
        if not child.beating or self.beats is None or now - child.started < START_GRACE_S:
            return None
        silent = self.beats.silent_for(child.name, now)
        if silent is None or silent < child.hung_s:
            return None
        child.proc.kill()  # SIGKILL reaches a stopped process too; never waited for here
        child.killed_at = now
        child.hung_kills += 1
        self._note(f"{child.name} hung: no sign of life for {silent:.0f} s; killed")
        return child.proc.poll()

    def counts(self) -> dict[str, dict[str, object]]:
        """Per child: restarts, the last exit code, when it was last restarted and hung kills."""
        return {c.name: {"restarts": c.restarts, "last_exit": c.last_exit, "last_restart": c.last_restart,
                         "running": c.proc is not None and c.proc.poll() is None, "hung_kills": c.hung_kills}
                for c in self.children.values()}

    def _note(self, line: str) -> None:
        stamped = f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}"
        self.say(line)
        try:  # 0640, as every log of the gateway
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            with os.fdopen(fd, "a") as log:
                log.write(stamped + "\n")
        except OSError as exc:  # said already; a full disk must not stop the gateway
            self.say(f"could not write {self.log_path}: {exc}")

    def _write_counts(self) -> None:
        tmp = self.counts_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(self.counts(), indent=1, sort_keys=True))
        tmp.replace(self.counts_path)
