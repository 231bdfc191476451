"""Three nats-server processes routed on loopback: compose.yaml's JetStream cluster on one machine,
for tests and demos (issue 11 item 4). Each node has its own store; all share the registry's
identities and NKeys, so every worker may connect to any node."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats.errors
from nats.js.errors import BadRequestError, ServiceUnavailableError

from . import nats_auth, procs, tls
from .broker import Broker, ClusterNode
from .schemas import subjects
from .services import bus
from .services.settings import WorkerSettings


class LocalCluster:
    """`size` routed nodes; `url` lists every node, as a worker's seed list does."""

    def __init__(self, data_dir: Path, creds_dir: Path, size: int = 3, endpoints: tuple[str, ...] = (),
                 apps: tuple[str, ...] = (), use_tls: bool = True) -> None:
        self.creds_dir = creds_dir
        # TLS for clients and between nodes (routes verify each other), from one CA of the cluster's
        self.certs = tls.make(data_dir / "tls") if use_tls else None
        nats_auth.ensure_creds(creds_dir, apps)
        if endpoints:  # their durables are named in every node's auth config before they exist
            nats_auth.record_endpoints(creds_dir, set(endpoints))
        self.data_dir, self.size = data_dir, size
        self.nodes = self._placed()

    def _placed(self) -> list[Broker]:
        """Nodes on ports free right now: they must be chosen before any node starts, since each
        node names its peers' routes, so another process may take one before its node binds it."""
        route_ports = [procs.free_port() for _ in range(self.size)]
        return [
            Broker(self.data_dir / f"n{i + 1}", port=procs.free_port(), creds_dir=self.creds_dir, certs=self.certs,
                   cluster=ClusterNode(f"n{i + 1}", route_ports[i],
                                       tuple(p for j, p in enumerate(route_ports) if j != i)))
            for i in range(self.size)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (bus.connect takes the list)."""
        scheme = "tls" if self.certs is not None else "nats"
        return ",".join(f"{scheme}://{n.host}:{n.port}" for n in self.nodes)

    def start(self, tries: int = 3) -> str:
        """Start every node; returns the seed list. A node that could not bind its ports (taken
        since they were chosen) dies: a fresh cluster (no store yet) is then placed anew, its new
        stores dropped, at most `tries` times; one started on existing stores just fails. A lost
        node would leave the rest a quorum that can never place an R3 stream ('no suitable peers
        for placement')."""
        fresh = not any((node.data_dir / "nats").exists() for node in self.nodes)
        for attempt in range(1, tries + 1):
            try:
                for node in self.nodes:
                    node.start()
                return self.url
            except procs.ChildExited:
                self.stop()
                if attempt == tries or not fresh:  # a store with a stream in it is never dropped
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.data_dir / "nats", ignore_errors=True)
                self.nodes = self._placed()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def node_named(self, server_name: str) -> Broker:
        """The node a cluster reports by name (a stream's leader)."""
        return next(n for n in self.nodes if n.cluster is not None and n.cluster.server_name == server_name)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


async def wait_for_jetstream(settings: WorkerSettings, timeout_s: float = 60.0) -> None:
    """Until the cluster has a JetStream meta leader (account info answers): before it, creating
    a stream is refused as 'JetStream system temporarily unavailable'."""
    nc = await bus.connect(settings, "admin")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def setup_when_placed(settings: WorkerSettings, replicas: int, timeout_s: float = 60.0) -> None:
    """`runtime.setup_topology` at R`replicas`, retried while the cluster cannot yet place it: a
    meta leader exists before every peer has joined ('no suitable peers for placement')."""
    from .runtime import setup_topology

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await setup_topology(settings, replicas)
            return
        except (BadRequestError, ServiceUnavailableError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(1.0)


async def stream_leader(settings: WorkerSettings, timeout_s: float = 30.0) -> tuple[str, list[str]]:
    """GW_EVENTS's leader and its current replicas, by server name; waits out an election (the
    stream answers no info request while it has no leader)."""
    nc = await bus.connect(settings, "admin")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                info = await nc.jetstream(timeout=2.0).stream_info(subjects.STREAM)
                if info.cluster is not None and info.cluster.leader:
                    return str(info.cluster.leader), [str(r.name) for r in info.cluster.replicas or []]
            except (TimeoutError, ServiceUnavailableError, nats.errors.Error):
                pass
            if loop.time() > deadline:
                raise TimeoutError("GW_EVENTS has no leader")
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
