"""Keep `gateway up`'s children alive (issue 11 item 1): a worker, model server or broker that
dies is started again with backoff, the event is logged and counted, and the gateway stops only
when it is told to.

Why restart rather than stop: every stage is a JetStream consumer, so a restarted worker takes up
what its predecessor left unacked, and a restarted broker recovers its store; stopping the whole
gateway instead turned one crash into an outage whose in-flight requests ran after a manual start.
"""

from __future__ import annotations

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


class Supervisor:
    """Polled by `gateway up` (tick); children are restarted in the order they were added, so a
    dead broker comes back before the workers that reconnect to it."""

    def __init__(self, log_path: Path, counts_path: Path, say: Callable[[str], None]) -> None:
        self.log_path, self.counts_path, self.say = log_path, counts_path, say
        self.children: dict[str, Child] = {}

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]],
            proc: subprocess.Popen[bytes] | None) -> None:
        """Supervise `proc`; `start` makes its replacement."""
        self.children[name] = Child(name, start, proc)

    def tick(self, now: float | None = None) -> None:
        """Notice what died and start what is due; never raises (a failed start is retried later)."""
        now = time.monotonic() if now is None else now
        for child in self.children.values():
            code = child.proc.poll() if child.proc is not None else child.last_exit
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
            child.started, child.due = time.monotonic(), None
            self._note(f"{child.name} restarted (restart {child.restarts})")
        try:
            self._write_counts()
        except OSError as exc:  # a full disk must not stop the gateway: the counts are for metrics
            self.say(f"could not write {self.counts_path}: {exc}")

    def counts(self) -> dict[str, dict[str, object]]:
        """Per child: restarts, the last exit code and when it was last restarted."""
        return {c.name: {"restarts": c.restarts, "last_exit": c.last_exit, "last_restart": c.last_restart,
                         "running": c.proc is not None and c.proc.poll() is None}
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
