"""Run the workers: each as its own process (`gateway up`), or all in one event loop (tests)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path

import msgspec

from . import procs
from .services import registry
from .services.auditor import shell as auditor
from .services.authz import shell as authz
from .services.budget import shell as budget
from .services.edge import shell as edge
from .services.invoker import shell as invoker
from .services.router import shell as router
from .services.settings import WorkerSettings
from .supervision import Beats

Runner = Callable[[WorkerSettings, asyncio.Event], Coroutine[None, None, None]]
_RUNNERS: dict[str, Runner] = {
    "edge": edge.run,
    "authz": authz.run,
    "budget": budget.run,
    "router": router.run,
    "invoker": invoker.run,
    "auditor": auditor.run,
}
# The services to run come from the registry of identities; a service without a runner fails here.
SERVICES: dict[str, Runner] = {ident.name: _RUNNERS[ident.name] for ident in registry.SERVICES}


def settings_path(data_dir: Path) -> Path:
    """Where `gateway up` leaves the settings its workers and `gateway status` read."""
    return data_dir / "runtime.json"


def write_settings(settings: WorkerSettings) -> Path:
    """Persist the settings for worker processes and later CLI calls."""
    path = settings_path(Path(settings.data_dir))
    path.write_bytes(msgspec.json.encode(settings))
    return path


def read_settings(data_dir: Path) -> WorkerSettings:
    """The settings of the gateway running from `data_dir`."""
    return msgspec.json.decode(settings_path(data_dir).read_bytes(), type=WorkerSettings)


def spawn_worker(settings: WorkerSettings, name: str, log_name: str | None = None,
                 beat_fd: int | None = None, settings_file: Path | None = None) -> subprocess.Popen[bytes]:
    """One `gateway worker NAME` process (replicas of a service share its durable consumer);
    `beat_fd`, the write end of its sign-of-life pipe (`supervision.Beats`), is handed over and
    closed here. `settings_file`: where the settings are written for it instead of the data dir's
    runtime.json (a worker beside a broker started for the occasion leaves that file alone)."""
    path = settings_file or settings_path(Path(settings.data_dir))
    if settings_file is not None:
        path.write_bytes(msgspec.json.encode(settings))
    elif not path.exists():
        write_settings(settings)
    log = Path(settings.data_dir) / "logs" / f"{log_name or name}.log"
    argv = [sys.executable, "-m", "enclave_gateway.cli", "worker", name, "--settings", str(path)]
    if beat_fd is None:
        return procs.spawn(argv, log)
    try:
        return procs.spawn([*argv, "--beat-fd", str(beat_fd)], log, pass_fds=(beat_fd,))
    finally:
        os.close(beat_fd)  # the child holds it now: its exit closes the pipe


def spawn_workers(settings: WorkerSettings, names: list[str] | None = None,
                  beats: Beats | None = None) -> dict[str, subprocess.Popen[bytes]]:
    """One `gateway worker NAME` process per service."""
    write_settings(settings)
    return {name: spawn_worker(settings, name, beat_fd=beats.open(name) if beats else None)
            for name in (names or list(SERVICES))}


async def run_all(settings: WorkerSettings, stop: asyncio.Event, names: list[str] | None = None) -> None:
    """Every service as a task of this loop, until `stop` is set."""
    async with asyncio.TaskGroup() as tg:
        for name in names or list(SERVICES):
            tg.create_task(SERVICES[name](settings, stop), name=name)
