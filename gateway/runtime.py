"""One machine's gateway: broker with per-service users, optional tiny engine, topology, the
active policy, and the worker processes."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from . import config, issuer, nats_auth, procs, supervisor
from .broker import Broker
from .engine import Engine
from .schemas import codec, subjects
from .schemas.events import PolicyActivated
from .services import bus
from .services.policy_store import activation
from .services.settings import WorkerSettings

log = logging.getLogger("enclave_gateway.runtime")


async def setup_topology(settings: WorkerSettings, replicas: int = 1) -> None:
    """Create or update GW_EVENTS and the consumers through the admin connection."""
    nc = await bus.connect(settings, "admin")
    try:
        await bus.ensure_topology(nc.jetstream(), replicas)
    finally:
        await nc.close()


async def active_policy(settings: WorkerSettings) -> PolicyActivated | None:
    """The newest PolicyActivated in the stream, if any."""
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        raw = await nc.jetstream().get_last_msg(subjects.STREAM, subjects.policy_activated(), direct=True)
        return codec.decode_as(raw.data or b"", PolicyActivated)  # type: ignore[no-any-return]
    except NotFoundError:
        return None
    finally:
        await nc.close()


async def activate(settings: WorkerSettings, folder: Path, by: str) -> PolicyActivated:
    """Validate the folder's bundle and publish it as the active policy; raises PolicyError."""
    event = activation(folder, by, bus.now_utc())
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        await bus.publish(nc.jetstream(), event)
    finally:
        await nc.close()
    return event


async def bootstrap_policy(settings: WorkerSettings, folder: Path) -> str:
    """Activate the configured bundle if none is active; an active one is kept (say so if it differs)."""
    current = await active_policy(settings)
    if current is None:
        return (await activate(settings, folder, "gateway up")).version
    wanted = activation(folder, "check", bus.now_utc()).version
    if wanted != current.version:
        log.warning(
            "policy %s stays active; %s in %s differs: run `gateway policy activate`", current.version, wanted, folder
        )
    return current.version


class Gateway:
    """Start with `with Gateway(...)`; everything stops on exit, children first, broker last."""

    def __init__(
        self,
        data_dir: Path,
        policy_dir: Path,
        *,
        nats_port: int,
        http_port: int,
        endpoints: dict[str, str],
        serve_tiny: str | None,
        max_body_bytes: int = 256 * 1024,
        trust_dev_issuer: bool = True,
    ) -> None:
        self.trust_dev_issuer = trust_dev_issuer
        self.data_dir, self.policy_dir = data_dir.resolve(), policy_dir.resolve()
        self.nats_port, self.http_port, self.max_body_bytes = nats_port, http_port, max_body_bytes
        self.endpoints, self.serve_tiny = dict(endpoints), serve_tiny
        self.broker = Broker(self.data_dir, port=nats_port)
        self.engine: Engine | None = Engine(self.data_dir) if serve_tiny else None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.nats_url = self.http_url = self.policy_version = ""

    @classmethod
    def from_config(cls, path: Path, nats_port: int | None, http_port: int | None) -> Gateway:
        """A gateway as `gateway.toml` describes it."""
        cfg = config.load(path)
        return cls(
            Path(cfg.data_dir),
            Path(cfg.policy_dir),
            nats_port=nats_port or cfg.nats.port,
            http_port=http_port or cfg.http.port,
            endpoints=cfg.endpoints,
            serve_tiny=cfg.engine.endpoint if cfg.engine.serve_tiny else None,
            max_body_bytes=cfg.http.max_body_bytes,
            trust_dev_issuer=cfg.auth.trust_dev_issuer,
        )

    @property
    def creds_dir(self) -> Path:
        """Each NATS user's credentials (0600)."""
        return self.data_dir / "creds"

    def start(self) -> None:
        """Broker, engine, keys, topology, policy, workers; returns once every worker consumes."""
        issuer.ensure_keys(self.data_dir / "keys")
        self.broker.authorization = nats_auth.authorization_block(nats_auth.ensure_creds(self.creds_dir))
        self.nats_url = self.broker.start()
        if self.engine is not None and self.serve_tiny:
            self.endpoints[self.serve_tiny] = self.engine.start()
        port = self.http_port or procs.free_port()
        self.http_url = f"http://127.0.0.1:{port}"
        self.settings = WorkerSettings(
            nats_url=self.nats_url,
            data_dir=str(self.data_dir),
            policy_dir=str(self.policy_dir),
            endpoints=self.endpoints,
            http_port=port,
            max_body_bytes=self.max_body_bytes,
            creds_dir=str(self.creds_dir),
            trust_dev_issuer=self.trust_dev_issuer,
        )
        supervisor.write_settings(self.settings)
        asyncio.run(setup_topology(self.settings))
        self.policy_version = asyncio.run(bootstrap_policy(self.settings, self.policy_dir))
        self.workers = supervisor.spawn_workers(self.settings)
        for name, proc in self.workers.items():
            procs.wait_for_line(self.data_dir / "logs" / f"{name}.log", f"{name} consuming", proc, 60.0)

    def stop(self) -> None:
        """Workers first (they drain), then the engine, then the broker."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            procs.stop(proc)
        if self.engine is not None:
            self.engine.stop()
        self.broker.stop()

    def wait_for_signal(self) -> None:
        """Block until SIGINT or SIGTERM, or until a worker dies."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        while not done.wait(1.0):
            dead = [n for n, p in self.workers.items() if p.poll() is not None]
            if dead:
                print(f"worker(s) exited: {', '.join(dead)}; stopping")
                return

    def __enter__(self) -> Gateway:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


async def wait_audited(nc: Client, timeout_s: float = 30.0) -> int:
    """Until the auditor has written and acked every message in the stream; returns the last seq."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ci = await js.consumer_info(subjects.STREAM, "auditor")
        info = await js.stream_info(subjects.STREAM)
        delivered = ci.delivered.stream_seq if ci.delivered else 0
        if ci.num_pending == 0 and ci.num_ack_pending == 0 and delivered == info.state.last_seq:
            return int(info.state.last_seq)
        await asyncio.sleep(0.2)
    raise TimeoutError("the auditor did not catch up with the stream")


async def status_rows(data_dir: Path) -> tuple[list[str], list[tuple[object, ...]]]:
    """Per consumer: delivered, pending, unacked, redelivered; plus the stream and the policy."""
    settings = supervisor.read_settings(data_dir)
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM)
        rows: list[tuple[object, ...]] = [("(stream)", info.state.messages, "", "", info.state.bytes)]
        for name in bus.CONSUMERS:
            ci = await js.consumer_info(subjects.STREAM, name)
            rows.append(
                (
                    name,
                    ci.delivered.stream_seq if ci.delivered else 0,
                    ci.num_pending,
                    ci.num_ack_pending,
                    ci.num_redelivered,
                )
            )
        policy = await active_policy(settings)
        rows.append(("(policy)", policy.version if policy else "none", "", "", ""))
        return ["consumer", "delivered seq / messages", "pending", "unacked", "redelivered / bytes"], rows
    finally:
        await nc.close()
