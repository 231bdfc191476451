"""Child processes that die with their parent: no orphan nats-server or model server."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


class StartFailed(RuntimeError):
    """Something `gateway up` started did not come up; the message says what and where to look."""


class ChildExited(StartFailed):
    """A child exited while we waited for it to start; the message names its log."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start a child whose output goes to `log_path` and that gets SIGTERM if we die."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    # 0640: a worker's log may name callers and endpoints; no one outside the gateway's group reads it
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.chmod(log_path, 0o640)  # one made before by an older version (0644) is narrowed too
    log: IO[bytes] = os.fdopen(fd, "ab")
    return subprocess.Popen(
        list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        env=env, pass_fds=tuple(pass_fds),
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for_line(log_path: Path, needle: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The first log line containing `needle`; raises if the child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists():
            for line in log_path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        if proc.poll() is not None:
            raise ChildExited(f"{proc.args!r} exited with {proc.returncode}; see {log_path}")
        time.sleep(0.05)
    raise TimeoutError(f"no {needle!r} in {log_path} after {timeout_s}s")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for servers that cannot pick their own (llama-cpp-python)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
