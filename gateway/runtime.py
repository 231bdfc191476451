"""One machine's gateway: broker with per-service users, optional tiny engine, topology, the
active policy, and the worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import msgspec
from nats.aio.client import Client

from . import config, issuer, nats_auth, procs, supervisor, tls
from .broker import Broker
from .engine import Engine
from .policy_admin import DEV_SIGNER, activation, dev_signer, trusted
from .schemas import subjects
from .schemas.events import PolicyActivated
from .schemas.policy import Catalog
from .services import bus, catalog, egress, registry
from .services.authz.policy_view import dev_jwks
from .services.invoker.adapters import HOSTED
from .services.policy import PolicyError, bundle_from_files, load_bundle
from .services.policy.feed import latest_valid
from .services.policy.signing import load_public, signing_time
from .services.settings import WorkerSettings
from .supervision import Beats, Supervisor

log = logging.getLogger("enclave_gateway.runtime")
READY_TIMEOUT_S = 90.0


def readiness(http_url: str) -> tuple[bool, str]:
    """The edge's /readyz: whether every stage consumes, and what it says (which stage does not)."""
    try:
        with urllib.request.urlopen(f"{http_url}/readyz", timeout=2) as resp:
            return resp.status == 200, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace")
    except OSError as exc:
        return False, f"the edge does not answer: {exc}"


def catalog_endpoints(folder: Path) -> set[str]:
    """Every endpoint the folder's catalog names (none when the bundle does not load)."""
    if not str(folder) or not (folder / "catalog.toml").is_file():
        return set()
    try:
        bundle = load_bundle(folder)
    except PolicyError:
        return set()
    return catalog.all_endpoints(bundle.catalog)


async def setup_topology(settings: WorkerSettings, replicas: int = 1, endpoints: tuple[str, ...] = ()) -> None:
    """Create or update GW_EVENTS and the consumers through the admin connection: the services',
    and one per endpoint that the catalog names or this deployment's invokers host."""
    hosted = {*endpoints, *settings.endpoints, *catalog_endpoints(Path(settings.policy_dir))}
    await protect_endpoints(settings, hosted)
    nc = await bus.connect(settings, "admin")
    try:
        await bus.ensure_topology(nc.jetstream(), replicas, hosted)
    finally:
        await nc.close()


async def protect_endpoints(settings: WorkerSettings, endpoints: set[str]) -> None:
    """Before an endpoint's durable is made, the broker refuses every runtime role the right to
    create, update or delete it (a hostile review rewrote one's filter with a service credential):
    the auth config names each endpoint durable, so it is rewritten and the broker reloaded."""
    creds = Path(settings.creds_dir) if settings.creds_dir else None
    if creds is None or not creds.is_dir() or not nats_auth.record_endpoints(creds, endpoints):
        return
    conf_dir = Path(settings.data_dir)
    if (conf_dir / nats_auth.AUTH_FILE).exists():
        nats_auth.write_authorization(creds, conf_dir)
        if nats_auth.reload_broker(conf_dir / "nats.pid"):
            await asyncio.sleep(0.5)  # the reload is asynchronous: let it land before the durable exists


async def active_policy(settings: WorkerSettings) -> PolicyActivated | None:
    """The activation the workers decide under: the validly signed one with the latest signing time.

    The newest message on the subject may be a refused forgery or junk a credential made the
    server store, so operator tooling selects exactly as the workers' feeds do.
    """
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        stored = await bus.stored_on(nc.jetstream(), subjects.policy_activated(), "admin")
        return latest_valid(stored, settings.policy_signers)
    finally:
        await nc.close()


def dev_signing_key(settings: WorkerSettings) -> Path | None:
    """The data dir's dev policy signer, when this deployment trusts it (no signer pinned)."""
    stem = settings.keys_dir / DEV_SIGNER
    key_file, pub_file = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub.json")
    if key_file.exists() and pub_file.exists() and load_public(pub_file).kid in settings.policy_signers:
        return key_file
    return None


def activation_for(settings: WorkerSettings, folder: Path, by: str) -> PolicyActivated:
    """The signed activation of a folder's bundle (its bundle.sig, else the trusted dev signer)."""
    trusted_dev = dev_jwks(settings)
    return activation(folder, by, bus.now_utc(), settings.policy_signers, dev_signing_key(settings),
                      trusted_dev[0] if trusted_dev else None)


def refuse_hosted_in_enclave(settings: WorkerSettings, folder: Path) -> None:
    """In enclave mode a catalog may not name a model served by a hosted API (Anthropic, Bedrock):
    their adapters are refused here as well as at call time."""
    if settings.egress_allow is not None and (folder / "catalog.toml").is_file():
        _refuse_hosted(load_bundle(folder).catalog, "the catalog names")


def _refuse_hosted(named: Catalog, whose: str, then: str = "") -> None:
    hosted = [f"{m.id} ({m.protocol})" for m in named.model if m.protocol in HOSTED]
    if hosted:
        raise PolicyError(f"enclave mode refuses the hosted-API adapters, and {whose} {', '.join(hosted)}{then}")


async def activate(settings: WorkerSettings, folder: Path, by: str) -> PolicyActivated:
    """Validate the folder's signed bundle and publish it as the active policy; raises PolicyError."""
    refuse_hosted_in_enclave(settings, folder)
    event = activation_for(settings, folder, by)
    current = await active_policy(settings)
    if current is not None and current.signed_at and event.signed_at and (
            signing_time(event.signed_at) <= signing_time(current.signed_at)):
        raise PolicyError(f"{folder} was signed at {event.signed_at}, before the active policy "
                          f"({current.signed_at}); workers never go back to an older signature: sign it again")
    named = catalog_endpoints(folder)
    await protect_endpoints(settings, named)
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        await bus.ensure_endpoints(nc.jetstream(), named)  # before any route to one
        if _limits_rates(folder):  # before any request is counted
            await bus.ensure_rate_counters(nc.jetstream())
        await bus.publish(nc.jetstream(), event)
    finally:
        await nc.close()
    return event


def _limits_rates(folder: Path) -> bool:
    """Whether the bundle sets any rate limit (its admission.toml)."""
    admission = load_bundle(folder).admission
    return admission is not None and bool(admission.team or admission.application or admission.model)


async def bootstrap_policy(settings: WorkerSettings, folder: Path) -> str:
    """Activate the configured bundle if none is active; an active one is kept (say so if it differs)."""
    current = await active_policy(settings)
    if current is None:
        return (await activate(settings, folder, "gateway up")).version
    if settings.egress_allow is not None:  # a gateway started in enclave mode over an active catalog
        _refuse_hosted(bundle_from_files(current.files).catalog, "the active catalog names",
                       ": activate one without them")
    wanted = activation_for(settings, folder, "check").version
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
        trusted_signers: tuple[Path, ...] = (),
        nats_host: str = "127.0.0.1",
        http_host: str = "127.0.0.1",
        request_timeout_s: float = 120.0,
        engine_port: int = 0,
        audit: config.AuditConfig | None = None,
        egress_allow: tuple[str, ...] | None = None,
        nats_tls: bool = False,
        otlp_traces_url: str = "",
        bus_url: str = "",
        bus_ca_file: str = "",
        stream_replicas: int = 1,
    ) -> None:
        """`bus_url` (a seed list) runs the gateway on a bus of its own (a JetStream cluster that
        shares `data_dir/creds`, `bus_ca_file` its CA) with the stream at `stream_replicas`; no
        broker is embedded, started or supervised then."""
        if bus_url and nats_tls:  # the embedded broker's own CA would be pinned for a bus it did not make
            raise procs.StartFailed("an external bus takes its CA as bus_ca_file; nats_tls is the embedded broker's")
        if egress_allow is not None:
            egress.parse(egress_allow)  # a bad entry stops the start, with its name
        self.egress_allow, self.otlp_traces_url = egress_allow, otlp_traces_url
        self.audit = audit or config.AuditConfig()
        self.trust_dev_issuer, self.trusted_signers = trust_dev_issuer, trusted_signers
        self.http_host, self.request_timeout_s = http_host, request_timeout_s
        self.data_dir, self.policy_dir = data_dir.resolve(), policy_dir.resolve()
        self.nats_port, self.http_port, self.max_body_bytes = nats_port, http_port, max_body_bytes
        self.endpoints, self.serve_tiny = dict(endpoints), serve_tiny
        self.certs = tls.make(self.data_dir / "tls", (nats_host, "localhost", "127.0.0.1")) if nats_tls else None
        self.bus_url, self.bus_ca_file, self.stream_replicas = bus_url, bus_ca_file, stream_replicas
        self.broker = None if bus_url else Broker(self.data_dir, host=nats_host, port=nats_port,
                                                  creds_dir=self.data_dir / "creds", certs=self.certs)
        self.engine: Engine | None = Engine(self.data_dir, port=engine_port or None) if serve_tiny else None
        self.notices: list[str] = []  # what `gateway up` must say on start (dev keys in use)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.beats = Beats()  # each worker's sign of life, read by the supervisor
        self.nats_url = self.http_url = self.policy_version = ""
        self._halted, self._ticking = threading.Event(), threading.Lock()
        self.say: Callable[[str], None] = lambda line: log.warning("%s", line)  # `gateway up` prints them

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
            trusted_signers=tuple(Path(p) for p in cfg.policy.trusted_signers),
            nats_host=cfg.nats.host,
            http_host=cfg.http.host,
            request_timeout_s=cfg.http.request_timeout_s,
            engine_port=cfg.engine.port,
            audit=cfg.audit,
            egress_allow=tuple(cfg.enclave.allow) if cfg.enclave.enabled else None,
            nats_tls=cfg.nats.tls,
            otlp_traces_url=cfg.telemetry.otlp_traces_url,
        )

    @property
    def creds_dir(self) -> Path:
        """Each NATS user's credentials (0600)."""
        return self.data_dir / "creds"

    def start(self) -> None:
        """Broker, engine, keys, topology, policy, workers; returns once every worker consumes."""
        self._halted.clear()  # a gateway stopped and started again is supervised again
        issuer.ensure_keys(self.data_dir / "keys")
        if self.certs is not None and (ending := tls.expiry(self.certs, datetime.now(UTC))) is not None:
            if ending[0] == "expired":  # every handshake would fail, seen by workers only as a lost bus
                raise procs.StartFailed(ending[1])
            self.notices.append(ending[1])
        signers = self._signers()
        self.nats_url = self.broker.start() if self.broker is not None else self.bus_url
        if self.engine is not None and self.serve_tiny:
            self.endpoints[self.serve_tiny] = self.engine.start()
        port = self.http_port or procs.free_port()
        self.http_url = f"http://{self.http_host}:{port}"
        self.settings = WorkerSettings(
            nats_url=self.nats_url,
            data_dir=str(self.data_dir),
            policy_dir=str(self.policy_dir),
            endpoints=self.endpoints,
            http_host=self.http_host,
            http_port=port,
            max_body_bytes=self.max_body_bytes,
            request_timeout_s=self.request_timeout_s,
            creds_dir=str(self.creds_dir),
            trust_dev_issuer=self.trust_dev_issuer,
            policy_signers=signers,
            audit_checkpoint_events=self.audit.checkpoint_events,
            audit_checkpoint_s=self.audit.checkpoint_seconds,
            egress_allow=self.egress_allow,
            otlp_traces_url=self.otlp_traces_url,
            nats_ca_file=str(self.certs.ca_file) if self.certs is not None else self.bus_ca_file,
        )
        supervisor.write_settings(self.settings)
        if self.broker is None:  # a cluster places an R3 stream only once every peer has joined
            from .cluster import setup_when_placed, wait_for_jetstream
            asyncio.run(wait_for_jetstream(self.settings))
            asyncio.run(setup_when_placed(self.settings, self.stream_replicas))
        else:
            asyncio.run(setup_topology(self.settings))
        self.policy_version = asyncio.run(bootstrap_policy(self.settings, self.policy_dir))
        self.workers = supervisor.spawn_workers(self.settings, beats=self.beats)
        self._wait_ready(READY_TIMEOUT_S)
        self.supervisor = self._supervise_children()

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the edge's /readyz says every stage consumes (logs are appended across restarts,
        so an old "consuming" line proves nothing); a child that exits meanwhile fails the start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    log_file = self.data_dir / "logs" / (name + ".log")
                    raise procs.ChildExited(f"worker {name} exited with {proc.returncode} while starting; "
                                            f"its last log line: {_last_line(log_file)}; see {log_file}")
            if readiness(self.http_url)[0]:
                return
            time.sleep(0.2)
        raise procs.StartFailed(f"the gateway was not ready after {timeout_s:g} s: {readiness(self.http_url)[1]}")

    def _supervise_children(self) -> Supervisor:
        """The broker first, then the engine, then the workers: the order they come back in."""
        sup = Supervisor(self.data_dir / "logs" / "supervisor.log", self.data_dir / "supervisor.json", self.say,
                         self.beats)
        broker, engine = self.broker, self.engine
        if broker is not None:
            def start_broker() -> subprocess.Popen[bytes]:
                broker.start()
                assert broker.proc is not None
                return broker.proc
            sup.add("nats-server", start_broker, broker.proc)
        if engine is not None:
            def start_engine() -> subprocess.Popen[bytes]:
                engine.start()
                assert engine.proc is not None
                return engine.proc
            sup.add(engine.name, start_engine, engine.proc)
        for name, proc in self.workers.items():
            sup.add(name, functools.partial(self._respawn, name), proc, beating=True)
        return sup

    def _respawn(self, name: str) -> subprocess.Popen[bytes]:
        self.workers[name] = supervisor.spawn_worker(self.settings, name, beat_fd=self.beats.open(name))
        return self.workers[name]

    def supervise(self, done: threading.Event, every_s: float = 0.5) -> None:
        """Restart what dies, until `done` is set or the gateway stops."""
        while not done.wait(every_s):
            with self._ticking:
                if self._halted.is_set():
                    return
                self.supervisor.tick()

    def _signers(self) -> dict[str, str]:
        """The pinned policy signers; with none configured, the data dir's dev signer (said out loud)."""
        if self.trusted_signers:
            return trusted(list(self.trusted_signers))
        key_file, public, made = dev_signer(self.data_dir / "keys")
        self.notices.append(
            f"DEV policy signer {public.kid} {'made' if made else 'in use'} ({key_file}, 0600): "
            "pin your own in gateway.toml [policy] trusted_signers before an assessment"
        )
        if self.trust_dev_issuer:
            self.notices.append("DEV token issuer trusted ([auth] trust_dev_issuer = true): off in an enclave")
        for notice in self.notices:  # `gateway up` prints them; a log keeps them for the others
            log.info("%s", notice)
        return {public.kid: public.public_key}

    def stop(self) -> None:
        """Workers first (they drain), then the engine, then the broker; nothing is restarted after."""
        with self._ticking:
            self._halted.set()
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            procs.stop(proc)
        self.beats.close_all()
        if self.engine is not None:
            self.engine.stop()
        if self.broker is not None:
            self.broker.stop()

    def wait_for_signal(self) -> None:
        """Supervise the children until SIGINT or SIGTERM: only being told stops the gateway."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.supervise(done)

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


@contextlib.contextmanager
def reachable_settings(data_dir: Path, audited: bool = False) -> Iterator[WorkerSettings]:
    """Settings that reach the data dir's stream: the running gateway's, or, when none runs, an
    embedded broker started on the stored data for the duration (`gateway replay` or `evidence
    export` after `gateway demo --data-dir D` has stopped).

    `audited`: such a broker gets an auditor beside it, so what is stored meanwhile (the console's
    page views) and the last checkpoint a stopping auditor published reach the audit tables an
    evidence package must cover. The data dir's runtime.json is never rewritten."""
    settings = supervisor.read_settings(data_dir)

    async def alive() -> bool:
        try:
            nc = await bus.connect(settings, "admin", keep_trying=False)
        except Exception:  # nothing listens there any more
            return False
        await nc.close()
        return True

    if asyncio.run(alive()):
        yield settings
        return
    certs = tls.paths(data_dir.resolve() / "tls") if settings.nats_ca_file else None
    broker = Broker(data_dir.resolve(), creds_dir=data_dir.resolve() / "creds", certs=certs)
    url = broker.start()
    occasional = msgspec.structs.replace(settings, nats_url=url)
    path = data_dir / "occasional-runtime.json"
    auditor = None
    try:
        if audited:
            auditor = supervisor.spawn_worker(occasional, "auditor", "occasional-auditor", settings_file=path)
        yield occasional
    finally:
        if auditor is not None:
            auditor.terminate()  # the auditor flushes what it holds on SIGTERM
            auditor.wait(30)
        path.unlink(missing_ok=True)
        broker.stop()


async def status_rows(data_dir: Path) -> tuple[list[str], list[tuple[object, ...]]]:
    """Per consumer: delivered, pending, unacked, redelivered; plus the stream and the policy."""
    settings = supervisor.read_settings(data_dir)
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM)
        rows: list[tuple[object, ...]] = [("(stream)", info.state.messages, "", "", info.state.bytes)]
        # every service's durable, then each endpoint's (an endpoint whose pending grows has no invoker)
        endpoints = sorted(c.name for c in await js.consumers_info(subjects.STREAM)
                           if c.name.startswith(registry.INVOKER_PREFIX))
        for name in [*registry.durables(), *endpoints]:
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


def _last_line(log_file: Path) -> str:
    """The last line a child logged (why it ended, usually), for the error that reports its end."""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1][:500] if lines else "(empty)"
