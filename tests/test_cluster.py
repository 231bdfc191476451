"""The gateway on a 3-node JetStream cluster (issue 11 item 4): three nats-server processes routed
on loopback over TLS (clients and routes), GW_EVENTS at R3, two replicas of every worker spread over
the nodes, and the stream's leader killed during traffic.

ADR-31 (direct gets): with `allow_direct` every replica of an R3 stream answers a direct get, so a
follower that lags can answer one stale. The budget's catch-up reads its team's newest ledger fact
with one, and its write carries `Nats-Expected-Last-Subject-Sequence`, which only the leader checks:
a stale read makes the write refused and retried, never a double spend. The test below hands the
budget's writer a stale sequence on purpose and watches the leader refuse it. The policy bootstrap
reads stored activations by direct get too, then follows the subject live, so a stale start is
corrected by the next delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats.errors
import pytest
import pytest_asyncio
from enclave_gateway.broker import Broker
from enclave_gateway import issuer, policy_admin, procs, runtime, supervisor
from enclave_gateway.cluster import LocalCluster, setup_when_placed, stream_leader, wait_for_jetstream
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client
from nats.js.errors import BadRequestError, ServiceUnavailableError

from .conftest import poison_exhausts_max_deliver, stream_events

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROOT = Path(__file__).resolve().parent.parent
APP = "clustered"


@pytest.fixture(scope="module")
def cluster_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data, policies = tmp_path_factory.mktemp("cluster-data"), tmp_path_factory.mktemp("cluster-policies")
    for f in (ROOT / "policies").iterdir():
        shutil.copy(f, policies / f.name)
    issuer.ensure_keys(data / "keys")
    return data, policies


@pytest.fixture(scope="module")
def cluster(cluster_dirs: tuple[Path, Path]) -> Iterator[LocalCluster]:
    data, _ = cluster_dirs
    c = LocalCluster(data, data / "creds", endpoints=("local-llama",), apps=(APP,))
    c.start()
    yield c
    c.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas(cluster: LocalCluster, cluster_dirs: tuple[Path, Path], engine: str
                   ) -> AsyncIterator[list[WorkerSettings]]:
    """Two replicas of every service, in this loop, each replica's connections seeded differently."""
    data, policies = cluster_dirs
    _, signer, _ = policy_admin.dev_signer(data / "keys")
    base = WorkerSettings(nats_url=cluster.url, data_dir=str(data), policy_dir=str(policies),
                          endpoints={"local-llama": engine}, creds_dir=str(data / "creds"),
                          nats_ca_file=str(cluster.certs.ca_file) if cluster.certs else "",
                          request_timeout_s=30.0, policy_signers={signer.kid: signer.public_key})
    await wait_for_jetstream(base)
    await setup_when_placed(base, replicas=3)
    await runtime.activate(base, policies, "cluster-test")
    urls = cluster.url.split(",")
    settings = [msgspec.structs.replace(base, http_port=procs.free_port(),
                                        nats_url=",".join(urls[i:] + urls[:i])) for i in range(2)]
    supervisor.write_settings(base)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(supervisor.run_all(s, stop)) for s in settings]
    await asyncio.sleep(3.0)  # every replica bound to its durables
    yield settings
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


def _submit(token: str) -> bytes:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="cluster?"),), max_tokens=3,
                    temperature=0.0)
    return codec.encode(SubmitRequest(token=token, chat=chat))


async def _ask(nc: Client, token: str) -> tuple[str, str | None]:
    """(request id, error code or None) as a batch caller hears it."""
    msg = await nc.request(subjects.submit(APP), _submit(token), timeout=60)
    reply = codec.decode_reply(msg.data)
    return reply.request_id, reply.error.code if reply.error else None


async def _events(nc: Client) -> list[dict[str, object]]:
    """Every event in the stream, decoded as plain JSON, oldest first."""
    for _ in range(30):  # just after nodes come back, JetStream may answer "temporarily unavailable", or late
        try:
            return [body for _, body in await stream_events(nc, timeout_s=10.0)]
        except (ServiceUnavailableError, nats.errors.TimeoutError):
            await asyncio.sleep(1)
    return [body for _, body in await stream_events(nc, timeout_s=10.0)]


async def test_the_stream_is_replicated_on_three_nodes_and_serves_two_replicas_of_each_worker(
        replicas: list[WorkerSettings], cluster_dirs: tuple[Path, Path]) -> None:
    leader, followers = await stream_leader(replicas[0])
    assert leader and len(followers) == 2 and leader not in followers
    app = await bus.connect(replicas[0], f"app.{APP}")
    admin = await bus.connect(replicas[0], "admin")
    try:
        for name in ("authz", "budget", "router", "edge"):  # both replicas pull from the one durable
            waiting = max([(await admin.jetstream().consumer_info(subjects.STREAM, name)).num_waiting or 0
                           for _ in range(5)])
            assert waiting >= 2, (name, waiting)
        token = issuer.issue(cluster_dirs[0] / "keys", subject="c", team="alpha", ttl_s=3600)
        answers = await asyncio.gather(*(_ask(app, token) for _ in range(6)))
        assert [code for _, code in answers] == [None] * 6
    finally:
        await app.close()
        await admin.close()


async def test_killing_the_streams_leader_during_traffic_loses_nothing_and_charges_once(
        replicas: list[WorkerSettings], cluster: LocalCluster, cluster_dirs: tuple[Path, Path]) -> None:
    token = issuer.issue(cluster_dirs[0] / "keys", subject="c", team="alpha", ttl_s=3600)
    leader, _ = await stream_leader(replicas[0])
    victim = cluster.node_named(leader)
    try:
        answers, after = await _kill_during_traffic(replicas[0], token, victim, leader)
        told = [a for a in [*answers, *after] if not isinstance(a, BaseException)]
        events = await _settled_and_delivered(replicas[0], {rid for rid, code in told if code != "audit_unavailable"})
    finally:  # the node comes back and catches up as a follower (the next test needs three)
        if victim.proc is None:
            victim.start()
    await asyncio.sleep(3)
    _, followers = await stream_leader(replicas[0], timeout_s=60)
    assert victim.cluster is not None and victim.cluster.server_name in followers
    ledger = [e for e in events if e.get("team") == "alpha" and "reserved_micros" in e]
    assert ledger[-1]["reserved_micros"] == 0, "a reservation was left open"
    by_rid: dict[str, list[dict[str, object]]] = {}
    for e in events:
        by_rid.setdefault(str(e.get("request_id")), []).append(e)
    assert len(told) >= 3
    for rid, code in told:
        if code == "audit_unavailable":  # the stream refused it during the election: never recorded, never run
            assert rid not in by_rid, by_rid[rid]
            continue
        mine = by_rid[rid]
        settled = [e for e in mine if e["type"] == "BudgetSettled"]
        closed = [e for e in mine if e["type"] in ("BudgetSettled", "BudgetReleased")]
        assert len(closed) <= 1, f"{rid} closed {len(closed)} times"
        assert (code is None) == (len(settled) == 1 and int(settled[0]["charged_micros"]) > 0), (rid, code, mine)  # type: ignore[call-overload]
        assert sum(1 for e in mine if e["type"] == "ResponseDelivered") == 1, (rid, [e["type"] for e in mine])
    spent = sum(int(e["charged_micros"]) for e in events  # type: ignore[call-overload]
                if e["type"] == "BudgetSettled" and e.get("team") == "alpha")
    assert ledger[-1]["spent_micros"] == spent


async def _kill_during_traffic(settings: WorkerSettings, token: str, victim: Broker, leader: str
                               ) -> tuple[list[tuple[str, str | None] | BaseException], list[tuple[str, str | None]]]:
    """Kill the leader under 12 requests (whatever they hear), then ask until three are served."""
    app = await bus.connect(settings, f"app.{APP}")
    try:
        asking = [asyncio.ensure_future(_ask(app, token)) for _ in range(12)]
        await asyncio.sleep(0.3)
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait(10)
        victim.proc = None
        answers = await asyncio.gather(*asking, return_exceptions=True)
        new_leader, _ = await stream_leader(settings, timeout_s=60)
        assert new_leader != leader
        after: list[tuple[str, str | None]] = []
        deadline = asyncio.get_running_loop().time() + 90
        while sum(1 for _, code in after if code is None) < 3:  # two nodes of three keep quorum: served again
            assert asyncio.get_running_loop().time() < deadline, after  # (an edge replica may be reconnecting)
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                after.append(await _ask(app, token))
        return answers, after
    finally:
        await app.close()


async def _settled_and_delivered(settings: WorkerSettings, told: set[str]) -> list[dict[str, object]]:
    """The stream once every reservation is closed and every told caller's delivery is recorded
    (a delivery whose first write met the election is recorded on its redelivery, seconds later)."""
    admin = await bus.connect(settings, "admin")
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            events = await _events(admin)
            ledger = [e for e in events if e.get("team") == "alpha" and "reserved_micros" in e]
            delivered = {str(e.get("request_id")) for e in events if e["type"] == "ResponseDelivered"}
            if (ledger[-1]["reserved_micros"] == 0 and told <= delivered) or asyncio.get_running_loop().time() > deadline:
                return events
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def test_a_poison_message_exhausts_max_deliver_on_the_cluster_and_the_caller_hears_once(
        replicas: list[WorkerSettings]) -> None:
    """The same bounded redelivery on an R3 stream with two replicas of every worker: one terminal
    RequestFailed, one reply (either edge replica may hold it, neither answers twice)."""
    admin = await bus.connect(replicas[0], "admin")
    app = await bus.connect(replicas[0], f"app.{APP}")
    try:
        await poison_exhausts_max_deliver(admin, app, "alpha", replicas[0])
    finally:
        await app.close()
        await admin.close()


async def test_a_stale_read_of_the_ledger_is_refused_by_the_leader_never_double_spent(
        replicas: list[WorkerSettings]) -> None:
    """ADR-31: whatever a follower answers, the leader checks the expected sequence."""
    admin = await bus.connect(replicas[0], "admin")
    try:
        js = admin.jetstream()
        newest = await js.get_last_msg(subjects.STREAM, subjects.ledger_filter("alpha"), direct=True)
        stale = int(newest.seq or 0) - 1
        with pytest.raises(BadRequestError) as refused:
            await js.publish(subjects.ledger("reserved", "alpha"), b"{}", headers={
                "Nats-Expected-Last-Subject-Sequence": str(stale),
                "Nats-Expected-Last-Subject-Sequence-Subject": subjects.ledger_filter("alpha")})
        assert "wrong last sequence" in str(refused.value)
        assert refused.value.err_code in bus.WRONG_LAST_SEQUENCE  # the leader's code (10164), not the single server's: a conflict
        assert int((await js.get_last_msg(subjects.STREAM, subjects.ledger_filter("alpha"))).seq or 0) == newest.seq
    finally:
        await admin.close()


async def test_with_quorum_lost_nothing_is_served_or_charged_unrecorded_and_it_resumes(
        replicas: list[WorkerSettings], cluster: LocalCluster, cluster_dirs: tuple[Path, Path]) -> None:
    """AU-5: two nodes of three down, the stream cannot record: callers hear a clear error."""
    token = issuer.issue(cluster_dirs[0] / "keys", subject="c", team="alpha", ttl_s=3600)
    admin = await bus.connect(replicas[0], "admin")
    try:
        before = [e for e in await _events(admin) if e.get("team") == "alpha" and "spent_micros" in e][-1]
    finally:
        await admin.close()
    down = cluster.nodes[:2]
    for node in down:
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait(10)
        node.proc = None
    app = await bus.connect(replicas[0], f"app.{APP}")
    try:
        chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="quorum?"),), max_tokens=3)
        body = codec.encode(SubmitRequest(token=token, chat=chat, timeout_s=4.0))
        refused: str | None = None
        for _ in range(60):  # until an edge replica has reconnected to the node left (no responders before)
            try:
                msg = await app.request(subjects.submit(APP), body, timeout=15)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.5)
                continue
            except nats.errors.TimeoutError:  # the stream neither stored nor refused it: no word at all,
                break  # never a "failed" (a copy may be stored; past its deadline it never runs)
            reply = codec.decode_reply(msg.data)
            assert reply.completion is None and reply.error is not None
            assert reply.error.code == "audit_unavailable", reply.error  # the server said no: not recorded
            refused = reply.request_id
            break
    finally:
        await app.close()
    for node in down:
        node.start()
    await stream_leader(replicas[0], timeout_s=60)
    app = await bus.connect(replicas[0], f"app.{APP}")
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the workers' consumers come back with the quorum
            try:
                served, code = await _ask(app, token)
            except TimeoutError:
                code = "no answer"
            if code is None or asyncio.get_running_loop().time() > deadline:
                break
        assert code is None
    finally:
        await app.close()
    admin = await bus.connect(replicas[0], "admin")
    try:
        for _ in range(120):  # the settlement follows the reply
            events = await _events(admin)
            if any(e["type"] == "BudgetSettled" and e.get("request_id") == served for e in events):
                break
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    ledger = [e for e in events if e.get("team") == "alpha" and "spent_micros" in e]
    if refused is not None:
        assert not any(e["type"] == "BudgetSettled" and e.get("request_id") == refused for e in events)
    quorum_lost = [e for e in events if e["type"] == "RequestSubmitted" and "quorum?" in str(e.get("chat"))]
    assert not any(e["type"] == "BudgetSettled" and e.get("request_id") in {q["request_id"] for q in quorum_lost}
                   for e in events)  # whatever was stored while the quorum was lost ran past its deadline: uncharged
    assert int(ledger[-1]["spent_micros"]) > int(before["spent_micros"])  # type: ignore[call-overload]


async def test_a_node_whose_route_port_was_taken_meanwhile_gets_the_cluster_placed_anew(tmp_path: Path) -> None:
    """The route port is bound after the node says it listens for clients: a node that lost its
    port to another process died unseen, and the other two never could place an R3 stream."""
    c = LocalCluster(tmp_path / "data", tmp_path / "creds", use_tls=False)
    taken = c.nodes[1].cluster.cluster_port if c.nodes[1].cluster else 0
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            c.start()
            assert all(n.proc is not None and n.proc.poll() is None for n in c.nodes)
            assert taken not in {n.cluster.cluster_port for n in c.nodes if n.cluster is not None}
        finally:
            c.stop()
