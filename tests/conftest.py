"""Real parts only: a nats-server with JetStream on a free port, llama.cpp's server on the tiny
model, and every worker running in the session's event loop (STYLE §6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio
from enclave_gateway import issuer, nats_auth, policy_admin, procs, runtime, supervisor
from enclave_gateway.broker import Broker
from enclave_gateway.engine import Engine
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody
from enclave_gateway.schemas.events import Caller, RouteSelected, Reservation
from enclave_gateway.services import bus, fact_signatures
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

ROOT = Path(__file__).resolve().parent.parent
APP = "tester"  # the application identity the session's `client` connects as
APPS = (APP, "other")
SUBMIT = f"gw.submit.{APP}"
TEST_TEAMS = """
[teams.gamma]
cap_micros = 1_000_000_000
period = "month"

[teams.tight]
cap_micros = 700
period = "month"
"""


from enclave_gateway.demo import DEMO_RATE_LIMIT  # noqa: E402

DOWN = f"http://127.0.0.1:{procs.free_port()}"  # nothing listens there
# A second llama.cpp server that test_routing starts, kills during traffic and starts again.
DUO_PORT = procs.free_port()
HANG_PORT = procs.free_port()  # a server test_routing starts that accepts and never answers
ANTHROPIC_PORT, BEDROCK_PORT = procs.free_port(), procs.free_port()  # servers of those shapes (test_adapters)


def model_toml(model_id: str, endpoints: list[str], protocol: str = "openai", enclave: bool = True) -> str:
    """A test model in catalog.toml: the tiny model's figures, served at `endpoints`."""
    accredited = 'accreditation = "SECRET//SI//NOFORN"\n' if enclave else ""
    return (f'\n[[model]]\nid = "{model_id}"\nprotocol = "{protocol}"\nendpoints = {json.dumps(endpoints)}\n'
            "context_length = 512\ndefault_max_tokens = 32\nprompt_micros_per_1k = 2000\n"
            "completion_micros_per_1k = 6000\n" + accredited)


TEST_MODELS = "".join([
    model_toml("enclave-tiny-ha", ["gpu-node-down", "local-llama"]),  # the first down: every request fails over
    model_toml("enclave-tiny-duo", ["duo-a", "local-llama"]),  # duo-a: started, killed and restarted in tests
    model_toml("enclave-tiny-solo", ["solo-b"]),  # hosted by no stack invoker: test_routing starts one that is
    # hosted APIs, for unclassified deployments: local servers of their shapes stand in (test_adapters)
    model_toml("claude-local", ["anthropic-local"], protocol="anthropic", enclave=False),
    model_toml("converse-local", ["bedrock-local"], protocol="bedrock", enclave=False),
    model_toml("enclave-tiny-orphan", ["orphan-ep", "local-llama"]),  # orphan-ep: no invoker pulls for it
    model_toml("enclave-tiny-down", ["gpu-node-down"]),  # its only endpoint refuses connections
    model_toml("enclave-tiny-hang", ["hang-node"]),  # a server that accepts and never answers, or stalls
])


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped bundle plus test-only teams (gamma: ample, tight: a few requests)."""
    folder = tmp_path_factory.mktemp("policies")
    for f in (ROOT / "policies").iterdir():
        shutil.copy(f, folder / f.name)
    with open(folder / "budgets.toml", "a") as fh:
        fh.write(TEST_TEAMS)
    with open(folder / "admission.toml", "a") as fh:  # the demo's burst client, 2 a minute (test_replay)
        fh.write(DEMO_RATE_LIMIT)
    with open(folder / "access_policy.csv", "a") as fh:
        fh.write("p, team:gamma, enclave-tiny\np, team:gamma, analyst-large\np, team:tight, enclave-tiny\n"
                 "p, team:gamma, enclave-tiny-ha\np, team:gamma, enclave-tiny-duo\np, team:gamma, enclave-tiny-hang\n"
                 "p, team:gamma, enclave-tiny-down\np, team:gamma, enclave-tiny-solo\n"
                 "p, team:gamma, claude-local\np, team:gamma, converse-local\np, team:gamma, enclave-tiny-orphan\n")
    shipped = (folder / "catalog.toml").read_text()
    assert "breaker_cooldown_s = 30" in shipped
    # a short cooldown, so a test sees a circuit open and close again
    (folder / "catalog.toml").write_text(shipped.replace("breaker_cooldown_s = 30", "breaker_cooldown_s = 4")
                                         + TEST_MODELS)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gateway's data dir: store, keys, audit."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def keys_dir(data_dir: Path) -> Path:
    """The dev issuer's key pair."""
    issuer.ensure_keys(data_dir / "keys")
    return data_dir / "keys"


@pytest.fixture(scope="session")
def broker(data_dir: Path) -> Iterator[Broker]:
    """A real nats-server -js on a port it picked itself (`port: -1`), with one user per service."""
    nats_auth.ensure_creds(data_dir / "creds", APPS)
    b = Broker(data_dir, creds_dir=data_dir / "creds")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server on the generated tiny model."""
    e = Engine(tmp_path_factory.mktemp("engine"))
    url = e.start()
    yield url
    e.stop()


@dataclass
class Collector:
    """A local OTLP/HTTP receiver: what an exporter posted to /v1/traces, decoded."""

    url: str
    spans: list[Span] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@contextlib.contextmanager
def collecting() -> Iterator[Collector]:
    """Receive OTLP/HTTP trace exports on a loopback port while the block runs."""
    got = Collector(url="")

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got.paths.append(self.path)
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    got.spans.extend(scope.spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    got.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        yield got
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def span_collector() -> Iterator[Collector]:
    """The test stack's OpenTelemetry collector."""
    with collecting() as got:
        yield got


@pytest.fixture(scope="session")
def settings(broker: Broker, engine: str, data_dir: Path, policy_dir: Path, keys_dir: Path,
             span_collector: Collector) -> WorkerSettings:
    """Worker settings pointing at the test broker and engine; a small body limit to test it.

    The data dir's dev policy signer is the one pinned signer, as `gateway up` does with none configured.
    """
    _, signer, _ = policy_admin.dev_signer(keys_dir)
    return WorkerSettings(nats_url=broker.url, data_dir=str(data_dir), policy_dir=str(policy_dir),
                          endpoints={"local-llama": engine, "gpu-node-down": DOWN,
                                     "duo-a": f"http://127.0.0.1:{DUO_PORT}",
                                     "hang-node": f"http://127.0.0.1:{HANG_PORT}",
                                     # a hosted API's endpoint says so: its keys go nowhere else
                                     "anthropic-local": f"anthropic+http://127.0.0.1:{ANTHROPIC_PORT}",
                                     "bedrock-local": f"bedrock+http://127.0.0.1:{BEDROCK_PORT}"}, http_port=procs.free_port(), max_body_bytes=64 * 1024,
                          request_timeout_s=60.0, creds_dir=str(data_dir / "creds"),
                          policy_signers={signer.kid: signer.public_key}, otlp_traces_url=span_collector.url)


@pytest_asyncio.fixture(scope="session")
async def stack(settings: WorkerSettings) -> AsyncIterator[WorkerSettings]:
    """Every worker running as tasks of the session loop; yields once the edge answers HTTP."""
    await runtime.setup_topology(settings)
    supervisor.write_settings(settings)  # what `gateway up` leaves for the CLI (`--data-dir`)
    await runtime.activate(settings, Path(settings.policy_dir), "conftest")
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run_all(settings, stop))
    await _wait_http(f"http://127.0.0.1:{settings.http_port}/health", task)
    yield settings
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), 20)
    except TimeoutError:
        names = sorted(t.get_name() for t in asyncio.all_tasks() if not t.done())
        raise AssertionError(f"workers did not stop: {names}") from None


async def _wait_http(url: str, task: asyncio.Task[None]) -> None:
    import aiohttp

    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if task.done():
                task.result()
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise TimeoutError(url)


@pytest_asyncio.fixture(scope="session")
async def client(stack: WorkerSettings) -> AsyncIterator[Client]:
    """An application's NATS connection (`app.tester`: may only request on gw.submit.tester)."""
    nc = await bus.connect(stack, f"app.{APP}")
    yield nc
    await nc.close()


@pytest_asyncio.fixture(scope="session")
async def admin(stack: WorkerSettings) -> AsyncIterator[Client]:
    """The operator's connection, for reading the stream in assertions."""
    nc = await bus.connect(stack, "admin")
    yield nc
    await nc.close()


@pytest.fixture(scope="session")
def http_url(stack: WorkerSettings) -> str:
    """Base URL of the HTTP edge."""
    return f"http://127.0.0.1:{stack.http_port}"


@pytest.fixture(scope="session")
def token_for(keys_dir: Path):  # type: ignore[no-untyped-def]
    """Issue a valid token: token_for(team, subject=..., roles=...)."""

    def issue(team: str, subject: str = "tester", roles: tuple[str, ...] = (), **kw: object) -> str:
        return issuer.issue(keys_dir, subject=subject, team=team, roles=roles, **kw)  # type: ignore[arg-type]

    return issue


async def stream_events(nc: Client, request_id: str | None = None, subject: str = "gw.evt.>",
                        timeout_s: float = 1.0) -> list[tuple[str, dict[str, object]]]:
    """Every (subject, decoded JSON) in GW_EVENTS matching the subject and request id."""
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=nats.js.api.DeliverPolicy.ALL)
    out: list[tuple[str, dict[str, object]]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            try:
                body = msgspec.json.decode(msg.data)
            except (msgspec.DecodeError, RecursionError):  # garbage published by the bad-input tests
                body = {}
            if request_id is None or (isinstance(body, dict) and body.get("request_id") == request_id):
                out.append((msg.subject, body))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def wait_for_event(nc: Client, request_id: str, type_name: str, timeout_s: float = 10.0) -> dict[str, object]:
    """Poll the stream until an event of `type_name` for the request shows up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, body in await stream_events(nc, request_id, timeout_s=0.5):
            if body.get("type") == type_name:
                return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {type_name} for {request_id} within {timeout_s}s")


def utc(ts: str) -> datetime:
    """Parse an ISO timestamp as UTC."""
    return datetime.fromisoformat(ts).astimezone(UTC)


async def publish_signed(js: nats.js.JetStreamContext, creds_dir: str | Path, name: str, subject: str,
                         data: bytes) -> nats.js.api.PubAck:
    """Store `data` on `subject` signed by identity `name`, as that stage's shell would: a test
    that drives a worker with a hand-made fact must sign it as its owner, or it is refused."""
    signer = fact_signatures.load_signer(creds_dir, name)
    assert signer is not None, name
    return await js.publish(subject, data, headers=signer.headers(subject, signer.msg_id(uuid.uuid4().hex), data))


async def poison_exhausts_max_deliver(admin: Client, client: Client, team: str, settings: WorkerSettings) -> None:
    """A handler that always raises on a real event: bounded redelivery, then a terminal
    RequestFailed, and the caller hears exactly once (on one node, or on the cluster)."""
    js = admin.jetstream()
    durable = f"poison-{uuid.uuid4().hex[:8]}"
    # the event's own subject (an event elsewhere is refused, not failed); no invoker hosts endpoint
    # "e", so only this test's consumer takes it
    subject = subjects.route_selected(durable, "e")
    await js.add_consumer(subjects.STREAM, ConsumerConfig(
        durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT, max_deliver=bus.MAX_DELIVER,
        ack_wait=30))
    rid = uuid.uuid4().hex
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    event = RouteSelected(event_id=f"{rid}:route", request_id=rid, occurred_at=datetime.now(UTC),
                          policy_version="test", caller=Caller(subject="s", team=team), requested_model="m",
                          model_id=durable, endpoint="e", max_tokens=1, chat=ChatBody(model="m", messages=()),
                          reservation=Reservation(team=team, period="2026-11", micros=0), reply_to=inbox)
    await publish_signed(js, settings.creds_dir, "router", subject, codec.encode(event))
    attempts = 0

    async def always_fails(_msg: object) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("model server on fire")

    stop = asyncio.Event()
    # the failing stage is played by the invoker's identity (it may pull any endpoint's durable), so
    # its terminal RequestFailed is signed by a stage that owns failures, as in production
    stage = await bus.connect(settings, "invoker")
    task = asyncio.create_task(bus.consume(stage.jetstream(), durable, always_fails, stop))
    try:
        reply = codec.decode_reply((await sub.next_msg(timeout=30)).data)
        failed = await wait_for_event(admin, rid, "RequestFailed", timeout_s=60)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=1.0)  # the later RequestFailed answers nobody a second time
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await stage.close()
    assert reply.error is not None and reply.error.code == "request_failed"
    assert "model server on fire" in str(failed["detail"])
    assert attempts == bus.MAX_DELIVER
    assert failed["stage"] == durable
