"""The record holds against every credential we hand out: a fact counts only with its owner's
signature, message ids no other identity can claim, no message stops a worker, and policy is
applied only from the stream. Each test is an attack a hostile tester ran against the gateway;
it checks the refusal itself (no answer, no charge, no decision changed), not the configuration."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from enclave_gateway import cli, issuer, runtime
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus, fact_signatures, registry
from enclave_gateway.services.policy import read_files
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APP, stream_events, wait_for_event
from .samples import SAMPLES_BY_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")
# 2 KB nested past the interpreter's recursion guard, where a decoder meets it: inside a field it skips
DEEP = b'{"type":"RequestSubmitted","schema_version":1,"x":' + b"[" * 1000 + b"]" * 1000 + b"}"


def _ask(token: str, text: str = "still serving?") -> bytes:
    return codec.encode(SubmitRequest(token=token, chat=ChatBody(
        model="enclave-tiny", max_tokens=2, messages=(ChatMessage(role="user", content=text),))))


async def _rejections(admin: Client, needle: str, stages: set[str], reason: str = "unsigned_fact") -> set[str]:
    """The stages that recorded a MessageRejected mentioning `needle` with `reason` (waits for all of `stages`)."""
    seen: set[str] = set()
    for _ in range(100):
        events = await stream_events(admin, subject=subjects.message_rejected(), timeout_s=0.3)
        seen = {str(b.get("stage")) for _, b in events
                if b.get("reason") == reason and needle in str(b.get("subject", "")) + str(b.get("stream_seq", ""))}
        if stages <= seen:
            break
        await asyncio.sleep(0.1)
    return seen


async def _stored(admin: Client, subject: str, data: bytes) -> int | None:
    """The stream sequence of a message with exactly these bytes on `subject`, if the server stored one."""
    sub = await admin.jetstream().subscribe(subject, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return None
            if msg.data == data:
                return msg.metadata.sequence.stream
            if msg.metadata.num_pending == 0:
                return None
    finally:
        await sub.unsubscribe()


def test_a_fact_counts_only_with_its_owners_signature_over_exactly_its_bytes(settings: WorkerSettings) -> None:
    pins = fact_signatures.load_pins(settings.creds_dir)
    assert pins is not None
    invoker = fact_signatures.load_signer(settings.creds_dir, "invoker")
    router = fact_signatures.load_signer(settings.creds_dir, "router")
    assert invoker is not None and router is not None
    subject, data = "gw.evt.invocation.completed.enclave-tiny", b'{"type":"InvocationCompleted"}'
    msg_id = invoker.msg_id("r1:invoke")
    good = invoker.headers(subject, msg_id, data)
    assert pins.owner(subject, good, data) == "invoker"
    refusals = {
        "unsigned": ({"Nats-Msg-Id": msg_id}, subject, data),
        "other bytes": (good, subject, data + b" "),
        "other subject": (good, "gw.evt.invocation.completed.other", data),
        "other message id": ({**good, "Nats-Msg-Id": "r1:invoke"}, subject, data),
        "not the owner": (router.headers(subject, msg_id, data), subject, data),
        "non-canonical base64": ({**good, fact_signatures.SIGNATURE: good[fact_signatures.SIGNATURE] + "="},
                                 subject, data),
        "unknown key": ({**good, fact_signatures.SIGNER: "U" + "A" * 55}, subject, data),
    }
    for why, (headers, subj, body) in refusals.items():
        with pytest.raises(codec.UnsignedFact):
            pins.owner(subj, headers, body)
            pytest.fail(why)
    # ids: the same for every republish of the decision, computable by no other identity
    assert invoker.msg_id("r1:invoke") == msg_id != "r1:invoke" and msg_id.startswith("r1:invoke:")
    assert router.msg_id("r1:invoke") != msg_id


def test_every_fact_subject_has_exactly_the_owners_the_registry_names() -> None:
    """Admin may write anything on the bus, but signs no stage's decision; applications sign nothing."""
    owners = {name: registry.by_name(name).signs for name in ("edge", "authz", "budget", "router", "invoker",
                                                              "auditor", "admin")}
    assert not any(registry.matches(p, "gw.evt.invocation.completed.x") for p in owners["admin"])
    assert any(registry.matches(p, "gw.evt.invocation.completed.x") for p in owners["invoker"])
    assert not any(registry.matches(p, "gw.evt.request.authorized.t") for n, ps in owners.items() if n != "authz"
                   for p in ps)
    assert registry.application("x").signs == () and registry.by_name("soc").signs == ()


async def test_a_forged_completion_the_server_stores_from_a_direct_get_reply_decides_nothing(
        admin: Client, stack: WorkerSettings) -> None:
    """The budget credential writes bytes of its choice into its snapshot bucket, then asks for them by
    direct get with the reply aimed at a completion subject: the server itself stores the answer there."""
    rid = uuid.uuid4().hex
    forged = msgspec.structs.replace(SAMPLES_BY_NAME["InvocationCompleted"], request_id=rid,
                                     event_id=f"{rid}:invoke", reply_to=f"_INBOX_app.other.{rid}")
    data = codec.encode(forged)
    target = subjects.for_event(forged)
    budget = await bus.connect(stack, "budget")
    other = await bus.connect(stack, "app.other")
    inbox = await other.subscribe("_INBOX_app.other.>")
    try:
        chunk = f"$O.{registry.BUDGET_BUCKET}.C.forge{rid[:8]}"
        await budget.jetstream().publish(chunk, data)
        await budget.publish(f"$JS.API.DIRECT.GET.OBJ_{registry.BUDGET_BUCKET}.{chunk}", b"", reply=target)
        await budget.flush()
        seq = None
        for _ in range(20):
            if (seq := await _stored(admin, target, data)) is not None:
                break
            await asyncio.sleep(0.1)
        if seq is not None:  # the path is open on this server: what it stored must count for nothing
            assert {"edge", "budget"} <= await _rejections(admin, str(seq), {"edge", "budget"})
        with pytest.raises(nats.errors.TimeoutError):
            await inbox.next_msg(timeout=1.0)
        kinds = {b.get("type") for _, b in await stream_events(admin, rid, timeout_s=0.3)}
        assert not kinds & {"BudgetSettled", "ResponseDelivered", "BudgetReleased"}, kinds
    finally:
        await budget.close()
        await other.close()


async def test_a_forged_authorization_signed_by_a_key_that_does_not_own_it_runs_nothing(
        admin: Client, stack: WorkerSettings) -> None:
    """Admin may publish on every subject and signs with its own key: a RequestAuthorized is not
    its fact, so no budget is reserved and no model runs."""
    rid = uuid.uuid4().hex
    forged = msgspec.structs.replace(SAMPLES_BY_NAME["RequestAuthorized"], request_id=rid, event_id=f"{rid}:authz",
                                     reply_to=f"_INBOX_app.other.{rid}")
    seq = await bus.publish(admin.jetstream(), forged)  # signed, by admin
    unsigned = await admin.jetstream().publish(subjects.for_event(forged), codec.encode(
        msgspec.structs.replace(forged, event_id=f"{rid}:authz2")), headers={"Nats-Msg-Id": uuid.uuid4().hex})
    assert "budget" in await _rejections(admin, str(seq), {"budget"})
    assert "budget" in await _rejections(admin, str(unsigned.seq), {"budget"})
    kinds = {b.get("type") for _, b in await stream_events(admin, rid, timeout_s=0.3)}
    assert not kinds & {"BudgetReserved", "RouteSelected", "InvocationCompleted"}, kinds


async def test_junk_stored_first_under_a_facts_old_predictable_id_cannot_censor_the_answer(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """The router credential sees each route as it is decided and stores junk under `<id>:invoke`
    before the invoker has answered: the answer is still stored, delivered and charged."""
    router = await bus.connect(stack, "router")
    js = router.jetstream()
    squatted: list[str] = []

    async def squat(msg: object) -> None:
        rid = codec.decode_event(msg.data).request_id  # type: ignore[attr-defined]
        for stage in ("invoke", "invoke-failed", "settle", "deliver"):
            await js.publish(subjects.endpoint_observed("squat"), b"junk", headers={"Nats-Msg-Id": f"{rid}:{stage}"})
        squatted.append(rid)

    watch = await bus.own_reader(js, "gw.evt.route.selected.>", "router_view", 0, start_time=datetime.now(UTC))
    task = asyncio.create_task(_each(watch, squat))
    try:
        reply = codec.decode_reply((await client.request(subjects.submit(APP), _ask(token_for("gamma")),
                                                         timeout=60)).data)
        assert reply.completion is not None, reply
        assert reply.request_id in squatted  # the junk was there first
        completed = await wait_for_event(admin, reply.request_id, "InvocationCompleted")
        assert completed["request_id"] == reply.request_id
        await wait_for_event(admin, reply.request_id, "BudgetSettled")
    finally:
        task.cancel()
        await watch.unsubscribe()
        await router.close()


async def _each(sub: object, handle: object) -> None:
    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)  # type: ignore[attr-defined]
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        except nats.errors.ConnectionClosedError:
            return
        await handle(msg)  # type: ignore[operator]


async def test_a_document_nested_a_thousand_deep_on_every_subject_stops_nothing(
        admin: Client, client: Client, stack: WorkerSettings, http_url: str, token_for) -> None:
    """Each identity, signing as itself (a buggy stage), stores it on every subject it owns; the
    operator stores it on the policy subject. Every worker keeps serving both entries, and the
    operator's commands still run."""
    published = 0
    for name in ("edge", "authz", "budget", "router", "invoker", "auditor", "admin"):
        nc = await bus.connect(stack, name)
        signer = bus.signer_of(nc.jetstream())
        assert signer is not None
        try:
            for pattern in registry.by_name(name).signs:
                subject = ".".join("zz" if t in ("*", ">") else t for t in pattern.split("."))
                msg_id = signer.msg_id(uuid.uuid4().hex)
                await nc.jetstream().publish(subject, DEEP, headers=signer.headers(subject, msg_id, DEEP))
                published += 1
        finally:
            await nc.close()
    assert published >= 15
    await asyncio.sleep(1.0)  # let every consumer meet them; the checks below wait on answers
    reply = codec.decode_reply((await client.request(subjects.submit(APP), _ask(token_for("gamma")), timeout=60)).data)
    assert reply.completion is not None, reply
    async with aiohttp.ClientSession() as http, http.post(
            f"{http_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token_for('gamma')}"},
            json={"model": "enclave-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as resp:
        assert resp.status == 200, await resp.text()
    rejected = await _rejections(admin, "", {"authz", "budget", "edge"}, reason="invalid_event")
    assert {"authz", "budget", "edge"} <= rejected
    active = await runtime.active_policy(stack)  # a starting worker's read of the policy subject
    assert active is not None
    data_dir = stack.data_dir
    for argv in (["status", "--data-dir", data_dir], ["replay", "--data-dir", data_dir]):
        code = await asyncio.to_thread(cli.main, argv)
        assert code in (0, 1), argv  # ran to its verdict: no traceback


async def test_an_activation_the_stream_never_stored_is_never_applied(
        admin: Client, client: Client, stack: WorkerSettings, token_for, tmp_path: Path) -> None:
    """A validly signed activation published under a message id the stream has seen is not stored:
    the workers must not decide under it (its core message still reaches their subscription)."""
    from .test_signed_policy import GRANT, _forbidden, _signed

    token = token_for("tight")
    version = await _forbidden(client, admin, token)
    key = runtime.dev_signing_key(stack)
    assert key is not None
    files = read_files(Path(stack.policy_dir))
    granted = _signed({**files, "access_policy.csv": files["access_policy.csv"] + GRANT}, key)
    js = admin.jetstream()
    first = await bus.publish_ack(js, msgspec.structs.replace(SAMPLES_BY_NAME["ConsoleViewed"],
                                                             event_id=f"{uuid.uuid4().hex}:console"))
    stored_id = (await js.get_msg(subjects.STREAM, first.seq)).headers["Nats-Msg-Id"]  # type: ignore[index]
    data = codec.encode(granted)
    signer = bus.signer_of(js)
    assert signer is not None
    ack = await js.publish(subjects.policy_activated(), data,
                           headers={**signer.headers(subjects.policy_activated(), stored_id, data)})
    assert ack.duplicate  # the stream did not take it
    await asyncio.sleep(fact_signatures_wait())
    assert await _forbidden(client, admin, token) == version


def fact_signatures_wait() -> float:
    """How long a worker looks for a live activation in the stream before refusing it, and a margin."""
    from enclave_gateway.services.policy import feed

    return feed.HISTORY_AGAIN_S * 1.5 + 0.5


async def test_a_header_byte_that_is_not_utf8_is_a_recorded_400(admin: Client, http_url: str, token_for) -> None:
    for header in ("Authorization", "X-Input-Classification"):
        value = ("Bearer " + token_for("gamma") + "\xff") if header == "Authorization" else "SECRET\xff"
        async with aiohttp.ClientSession() as http, http.post(  # the client writes header strings as latin-1
                f"{http_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token_for('gamma')}",
                                                            header: value},
                json={"model": "enclave-tiny", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            answer = await resp.json()
            rid = resp.headers.get("X-Request-Id")
        # a bearer token that is not UTF-8 is a malformed token (401); a label, a bad request (400)
        assert (resp.status, answer["error"]["code"]) in (
            (400, "invalid_request"), (400, "label_invalid"), (401, "token_malformed")), answer
        assert rid is not None
        recorded = [b for _, b in await stream_events(admin, subject="gw.evt.>", timeout_s=0.3)
                    if b.get("request_id") == rid]
        assert recorded, "the refusal is not in the record"


async def test_a_token_within_the_stated_leeway_past_its_expiry_is_accepted(http_url: str, keys_dir: Path) -> None:
    now = datetime.now(UTC)

    def issued_ago(seconds: int, subject: str) -> str:  # an hour's token issued that long ago
        return issuer.issue(keys_dir, subject=subject, team="gamma", ttl_s=3600,
                            now=int((now - timedelta(seconds=seconds)).timestamp()))

    late, stale = issued_ago(3620, "late"), issued_ago(3700, "stale")
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{http_url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {late}"}) as resp:
            assert resp.status == 200, await resp.text()  # 20 s past exp, inside the 30 s leeway
        async with http.post(f"{http_url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {stale}"}) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "token_expired"
