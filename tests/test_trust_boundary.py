"""Issue 8 against the running broker: every identity of the registry is refused, by the server
itself, everything it does not own, and the stream does not grow; applications cannot read each
other's answers; `gw.submit` answers only on the requester's own inbox."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
from enclave_gateway import cli, nats_auth
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus, registry
from enclave_gateway.services.credentials import load_creds
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APPS, stream_events
from .samples import SAMPLES_BY_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")
S = subjects.STREAM
API = "$JS.API"

# One concrete subject for every family a hostile credential might try (DESIGN §2, issue 8 item 8).
EVENT_FAMILIES = (
    "gw.evt.request.submitted", "gw.evt.request.authorized.gamma", "gw.evt.request.denied.gamma",
    "gw.evt.request.failed", "gw.evt.message.rejected", "gw.evt.response.delivered",
    "gw.evt.response.undelivered", "gw.evt.ledger.reserved.gamma", "gw.evt.ledger.settled.gamma",
    "gw.evt.ledger.released.gamma", "gw.evt.ledger.threshold.gamma", "gw.evt.budget.rejected.gamma",
    "gw.evt.route.selected.enclave-tiny", "gw.evt.route.selected.enclave-tiny.local-llama", "gw.evt.route.unavailable.x", "gw.evt.invocation.completed.x",
    "gw.evt.invocation.failed.x", "gw.evt.policy.activated", "gw.evt.audit.checkpoint", "gw.evt.console.viewed",
)
CORE_FAMILIES = (
    "gw.submit", *(subjects.submit(a) for a in APPS), "_INBOX_app.tester.x", "_INBOX_app.other.x",
    "_INBOX_edge.x", "_INBOX_authz.x", "_INBOX.x", "anything.else",
    "_CHUNK_app.tester.x", "_CHUNK_app.other.x", "_CHUNK_edge.x.y",  # streamed tokens: invokers' alone
    "gw.rate.20261129T1200.team.gamma-00000000.requests",  # a rate counter: the budget's alone (a give-back frees a slot)
)
JS_FAMILIES = (
    f"{API}.INFO", f"{API}.STREAM.NAMES", f"{API}.STREAM.LIST", f"{API}.STREAM.CREATE.EVIL",
    f"{API}.STREAM.UPDATE.{S}", f"{API}.STREAM.DELETE.{S}", f"{API}.STREAM.PURGE.{S}", f"{API}.STREAM.INFO.{S}",
    f"{API}.STREAM.MSG.GET.{S}", f"{API}.STREAM.MSG.DELETE.{S}", f"{API}.STREAM.SNAPSHOT.{S}",
    f"{API}.DIRECT.GET.{S}", f"{API}.DIRECT.GET.{S}.gw.evt.request.submitted", f"{API}.DIRECT.GET.{S}.gw.evt.>",
    f"{API}.DIRECT.GET.{S}.gw.evt.policy.activated", f"{API}.DIRECT.GET.{S}.gw.evt.ledger.*.gamma",
    f"{API}.CONSUMER.CREATE.{S}", f"{API}.CONSUMER.CREATE.{S}.mine.gw.evt.request.submitted",
    f"{API}.CONSUMER.CREATE.{S}.mine.gw.evt.ledger.>", f"{API}.CONSUMER.LIST.{S}",
    *(
        s
        for d in registry.durables(("local-llama",))  # the services' and an endpoint's invokers'
        for s in (
            f"{API}.CONSUMER.CREATE.{S}.{d}", f"{API}.CONSUMER.CREATE.{S}.{d}.gw.evt.ledger.>",
            f"{API}.CONSUMER.CREATE.{S}.{d}.gw.evt.policy.activated",
            f"{API}.CONSUMER.DURABLE.CREATE.{S}.{d}", f"{API}.CONSUMER.DELETE.{S}.{d}",
            f"{API}.CONSUMER.INFO.{S}.{d}", f"{API}.CONSUMER.MSG.NEXT.{S}.{d}", f"$JS.ACK.{S}.{d}.1.1.1.1.0",
        )
    ),
    # purged or deleted, the rate counters would let every limit start over
    f"{API}.STREAM.PURGE.{subjects.RATES_STREAM}", f"{API}.STREAM.DELETE.{subjects.RATES_STREAM}",
    f"{API}.STREAM.UPDATE.{subjects.RATES_STREAM}", f"{API}.STREAM.MSG.DELETE.{subjects.RATES_STREAM}",
    f"$O.{registry.BUDGET_BUCKET}.C.x", "$KV.any.key", f"{API}.STREAM.DELETE.OBJ_{registry.BUDGET_BUCKET}",
    # a consumer on the snapshot bucket could push its bytes at any subject (hostile review F2)
    f"{API}.CONSUMER.CREATE.OBJ_{registry.BUDGET_BUCKET}", f"{API}.CONSUMER.CREATE.OBJ_{registry.BUDGET_BUCKET}.x.y",
)
SUBSCRIBE_FAMILIES = (
    ">", "gw.evt.>", "gw.evt.request.submitted", "gw.evt.request.denied.>", "gw.evt.policy.activated",
    "gw.evt.ledger.>", "_INBOX.>", "_INBOX_app.>", "_INBOX_app.tester.>", "_INBOX_app.other.>", "_INBOX_edge.>",
    "_INBOX_authz.>", "_INBOX_budget.>", "gw.submit.>", "gw.submit.tester", "$JS.EVENT.>", "$JS.API.>",
    "_CHUNK_app.>", "_CHUNK_app.tester.>", "_CHUNK_app.other.>", "_CHUNK_edge.>", "gw.rate.>",
)
# Whatever the registry says, no runtime role may ever do these (a too-generous registry fails here).
NEVER = (
    f"{API}.STREAM.UPDATE.{S}", f"{API}.STREAM.DELETE.{S}", f"{API}.STREAM.PURGE.{S}", f"{API}.DIRECT.GET.{S}",
    f"{API}.STREAM.MSG.GET.{S}", f"{API}.CONSUMER.CREATE.{S}", "gw.evt.policy.activated",
    *(f"{API}.CONSUMER.DELETE.{S}.{d}" for d in registry.durables()),
    *(f"{API}.CONSUMER.CREATE.{S}.{d}.gw.evt.ledger.>" for d in registry.durables()),
    *(f"{API}.CONSUMER.CREATE.{S}.{d}.gw.evt.policy.activated" for d in registry.durables(("local-llama",))),
    f"{API}.CONSUMER.CREATE.OBJ_{registry.BUDGET_BUCKET}",
    f"{API}.STREAM.PURGE.{subjects.RATES_STREAM}", f"{API}.STREAM.DELETE.{subjects.RATES_STREAM}",
)
READS_TOKENS = {"authz", "auditor", "admin"}  # who may read a RequestSubmitted and so a bearer token


def runtime_identities() -> list[registry.Identity]:
    """Every identity but admin: the services, soc and the test applications."""
    return [i for i in (*registry.fixed(), *(registry.application(a) for a in APPS)) if not i.unrestricted]


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_the_registry_never_grants_what_no_runtime_role_may_do() -> None:
    for ident in runtime_identities():
        granted = [s for s in NEVER if registry.may_publish(ident, s, ("local-llama",))]
        assert not granted, f"{ident.name} may {granted}"
        reads = [s for s in (f"{API}.DIRECT.GET.{S}.gw.evt.request.submitted", "gw.evt.request.submitted")
                 if registry.may_publish(ident, s) and "DIRECT" in s]
        assert not reads or ident.name in READS_TOKENS, f"{ident.name} can read bearer tokens: {reads}"
        perms = registry.permissions(ident)
        assert perms is not None
        for side in ("publish", "subscribe"):  # an empty allow list means "everything" to nats-server
            assert perms[side].get("allow") or perms[side].get("deny") == [">"], (ident.name, side)


async def _connect_as(settings: WorkerSettings, name: str, errors: list[str]) -> Client:
    creds = load_creds(settings.creds_dir, name)
    assert creds is not None, name

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(settings.nats_url, nkeys_seed=creds.seed_file, inbox_prefix=creds.inbox_prefix,
                              error_cb=on_error, allow_reconnect=False)


def _refused(errors: list[str], verb: str, subject: str, queue: str | None = None) -> bool:
    needle = f'permissions violation for {verb} to "{subject.lower()}"'
    if queue:
        needle += f' using queue "{queue}"'
    return any(needle in e for e in errors)


@pytest.mark.parametrize("name", [i.name for i in runtime_identities()])
async def test_every_identity_is_refused_what_it_does_not_own(admin: Client, stack: WorkerSettings,
                                                              name: str) -> None:
    ident = registry.by_name(name, APPS)
    js = admin.jetstream()
    before = (await js.stream_info(S)).state.last_seq
    marker = uuid.uuid4().hex  # found in anything a forged publish led to, however a worker re-encoded it
    errors: list[str] = []
    nc = await _connect_as(stack, name, errors)
    try:
        protected = nats_auth.endpoints(Path(stack.creds_dir))  # what the broker's auth config names
        assert "local-llama" in protected
        probes = [s for s in (*EVENT_FAMILIES, *CORE_FAMILIES, *JS_FAMILIES)
                  if not registry.may_publish(ident, s, protected)]
        for subject in probes:
            await nc.publish(subject, b'{"type":"RequestAuthorized","forged":"%s"}' % marker.encode(),
                             reply=f"{ident.inbox_prefix}.p")
        subs = [(s, q) for s in SUBSCRIBE_FAMILIES for q in (None, "edge") if not registry.may_subscribe(ident, s, q)]
        for subject, queue in subs:
            await nc.subscribe(subject, queue=queue or "")
        await nc.flush()
        await asyncio.sleep(0.3)
        missing = [s for s in probes if not _refused(errors, "publish", s)]
        assert not missing, f"{name} was not refused publishing {missing}"
        missing_subs = [(s, q) for s, q in subs if not _refused(errors, "subscription", s, q)]
        assert not missing_subs, f"{name} was not refused subscribing {missing_subs}"
        assert nc.is_connected
    finally:
        await nc.close()
    landed = await _landed_since(admin, before)
    forged = [(subject, data) for subject, data in landed if marker.encode() in data or not subject.startswith("gw.evt.")]
    assert not forged, f"{name}'s forged publishes reached the stream: {forged}"
    assert {c for c in registry.durables(("local-llama",))} <= {c.name for c in await js.consumers_info(S)}


async def _landed_since(admin: Client, last_seq: int) -> list[tuple[str, bytes]]:
    """Every message stored after `last_seq`. The shared stack's workers may still record a late fact of an
    earlier test (a checkpoint, a release), so the check is what landed, not how many: none may be forged."""
    js = admin.jetstream()
    end = (await js.stream_info(S)).state.last_seq
    landed = []
    for seq in range(last_seq + 1, end + 1):
        msg = await js.get_msg(S, seq)
        landed.append((msg.subject or "", msg.data or b""))
    return landed


def _chat(text: str) -> bytes:
    return codec.encode(SubmitRequest(token="", chat=ChatBody(model="enclave-tiny", messages=(
        ChatMessage(role="user", content=text),), max_tokens=4)))


async def test_two_applications_cannot_read_each_others_answers(stack: WorkerSettings, token_for) -> None:
    errors_a: list[str] = []
    errors_b: list[str] = []
    a = await _connect_as(stack, "app.tester", errors_a)
    b = await _connect_as(stack, "app.other", errors_b)
    try:
        spy_on_a = await b.subscribe("_INBOX_app.tester.>")
        spy_on_all = await b.subscribe("_INBOX_app.>")
        spy_on_b = await a.subscribe("_INBOX_app.other.>")
        await asyncio.sleep(0.2)
        body = codec.encode(SubmitRequest(token=token_for("gamma"), chat=ChatBody(
            model="enclave-tiny", messages=(ChatMessage(role="user", content="mine"),), max_tokens=4)))
        ra, rb = await asyncio.gather(a.request(subjects.submit("tester"), body, timeout=30),
                                      b.request(subjects.submit("other"), body, timeout=30))
        assert codec.decode_reply(ra.data).completion is not None
        assert codec.decode_reply(rb.data).completion is not None
        assert ra.subject.startswith("_INBOX_app.tester.") and rb.subject.startswith("_INBOX_app.other.")
        for spy in (spy_on_a, spy_on_all, spy_on_b):
            with pytest.raises(nats.errors.TimeoutError):
                await spy.next_msg(timeout=0.3)
        assert _refused(errors_b, "subscription", "_INBOX_app.tester.>")
        assert _refused(errors_b, "subscription", "_INBOX_app.>")
        assert _refused(errors_a, "subscription", "_INBOX_app.other.>")
        # and one application cannot submit as the other (the subject names the sender)
        await a.publish(subjects.submit("other"), body, reply="_INBOX_app.tester.x")
        await a.flush()
        await asyncio.sleep(0.2)
        assert _refused(errors_a, "publish", subjects.submit("other"))
    finally:
        await a.close()
        await b.close()


async def _rejections(admin: Client, marker: str) -> list[dict[str, object]]:
    events = await stream_events(admin, subject=subjects.message_rejected(), timeout_s=0.5)
    return [body for _, body in events if body.get("reason") == "reply_subject_refused"
            and marker in str(body.get("detail"))]


@pytest.mark.parametrize("reply", ["_INBOX_app.other.{m}", "gw.evt.request.failed", "gw.evt.response.delivered",
                                   "gw.evt.request.submitted", "_INBOX_edge.{m}", "_INBOX_app.tester",
                                   "_INBOX_app.tester.{m}.>", "_INBOX_app.tester.{m}.*", "_INBOX_app.tester..{m}",
                                   "_INBOX_app.tester.{m}."])
async def test_gw_submit_answers_only_on_the_requesters_own_inbox(admin: Client, stack: WorkerSettings, token_for,
                                                                  reply: str) -> None:
    marker = uuid.uuid4().hex
    reply_to = reply.format(m=marker)
    js = admin.jetstream()
    other = await bus.connect(stack, "app.other")
    watch = await other.subscribe("_INBOX_app.other.>")
    try:
        info = await js.stream_info(S, subjects_filter="gw.evt.request.submitted")
        submitted = sum((info.state.subjects or {}).values())
        failed_before = await _count(admin, reply_to) if reply_to.startswith("gw.evt.") else 0
        body = codec.encode(SubmitRequest(token=token_for("gamma"), chat=ChatBody(
            model="enclave-tiny", messages=(ChatMessage(role="user", content=marker),), max_tokens=4)))
        tester = await bus.connect(stack, "app.tester")
        try:
            await tester.publish(subjects.submit("tester"), body, reply=reply_to)
            await tester.flush()
        finally:
            await tester.close()
        for _ in range(50):
            if await _rejections(admin, reply_to if "{m}" not in reply else marker):
                break
            await asyncio.sleep(0.1)
        assert await _rejections(admin, reply_to if "{m}" not in reply else marker), "the refusal was not recorded"
        info = await js.stream_info(S, subjects_filter="gw.evt.request.submitted")
        assert sum((info.state.subjects or {}).values()) == submitted, "a refused request was run"
        if reply_to.startswith("gw.evt."):
            assert await _count(admin, reply_to) == failed_before, "the edge answered into the audit stream"
        with pytest.raises(nats.errors.TimeoutError):
            await watch.next_msg(timeout=0.3)
    finally:
        await other.close()


async def test_a_request_without_a_reply_subject_is_refused_and_recorded(admin: Client, stack: WorkerSettings,
                                                                         token_for) -> None:
    js = admin.jetstream()
    before = await _count(admin, "gw.evt.request.submitted")
    rejected = len(await _rejections(admin, "must carry a reply subject"))
    tester = await bus.connect(stack, "app.tester")
    try:
        await tester.publish(subjects.submit("tester"), codec.encode(SubmitRequest(token=token_for("gamma"), chat=ChatBody(
            model="enclave-tiny", messages=(ChatMessage(role="user", content="fire and forget"),), max_tokens=4))))
        await tester.flush()
    finally:
        await tester.close()
    for _ in range(50):
        if len(await _rejections(admin, "must carry a reply subject")) > rejected:
            break
        await asyncio.sleep(0.1)
    assert len(await _rejections(admin, "must carry a reply subject")) == rejected + 1
    assert await _count(admin, "gw.evt.request.submitted") == before
    assert (await js.stream_info(S)).state.messages > 0


async def _count(admin: Client, subject: str) -> int:
    info = await admin.jetstream().stream_info(S, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_app_add_and_remove_on_the_running_broker(stack: WorkerSettings, token_for) -> None:
    data_dir = stack.data_dir
    assert cli.main(["app", "add", "carol", "--data-dir", data_dir]) == 0
    assert cli.main(["app", "add", "bad.name", "--data-dir", data_dir]) == 1
    assert "carol" in nats_auth.apps(Path(stack.creds_dir))
    await asyncio.sleep(0.5)  # the broker reloads on SIGHUP
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    creds = load_creds(stack.creds_dir, "app.carol")
    assert creds is not None
    carol = await nats.connect(stack.nats_url, nkeys_seed=creds.seed_file, inbox_prefix=creds.inbox_prefix,
                               allow_reconnect=False, closed_cb=on_closed)
    body = codec.encode(SubmitRequest(token=token_for("gamma"), chat=ChatBody(
        model="enclave-tiny", messages=(ChatMessage(role="user", content="hello"),), max_tokens=4)))
    reply = codec.decode_reply((await carol.request(subjects.submit("carol"), body, timeout=30)).data)
    assert reply.completion is not None
    seed = creds.seed_file
    seed_text = Path(seed).read_bytes()
    assert cli.main(["app", "remove", "carol", "--data-dir", data_dir]) == 0
    await asyncio.wait_for(closed.wait(), 10)  # the server dropped the revoked identity's connection
    revoked = Path(stack.creds_dir) / "revoked-carol.nk"
    nats_auth.write_private(revoked, seed_text)
    with pytest.raises(nats.errors.Error):
        await nats.connect(stack.nats_url, nkeys_seed=str(revoked), allow_reconnect=False, connect_timeout=2,
                           max_reconnect_attempts=1)
    assert cli.main(["app", "list", "--data-dir", data_dir]) == 0


@pytest.mark.parametrize("sample", ["RequestAuthorized", "InvocationCompleted"])
async def test_an_event_passed_off_on_a_subject_it_does_not_belong_to_is_refused(admin: Client, stack: WorkerSettings,
                                                                                 sample: str) -> None:
    """The router may publish `gw.evt.request.failed`; a RequestAuthorized body there must not be
    reserved and run, nor a forged completion answered (the hostile review's type confusion)."""
    rid = uuid.uuid4().hex
    forged = msgspec.structs.replace(SAMPLES_BY_NAME[sample], request_id=rid, event_id=f"{rid}:forged",
                                     reply_to=f"_INBOX_app.other.{rid}")
    other = await bus.connect(stack, "app.other")
    watch = await other.subscribe("_INBOX_app.other.>")
    router = await bus.connect(stack, "router")
    try:
        seq = (await router.jetstream().publish(subjects.request_failed(), codec.encode(forged))).seq
        rejected_by: set[str] = set()
        for _ in range(100):
            events = await stream_events(admin, f"seq-{seq}", subject=subjects.message_rejected(), timeout_s=0.3)
            rejected_by = {str(body.get("stage")) for _, body in events}
            if {"budget", "edge"} <= rejected_by:
                break
            await asyncio.sleep(0.1)
        assert {"budget", "edge"} <= rejected_by, rejected_by
        assert not await stream_events(admin, rid, timeout_s=0.3) or all(
            body.get("type") not in ("BudgetReserved", "ResponseDelivered", "RouteSelected")
            for _, body in await stream_events(admin, rid, timeout_s=0.3))
        with pytest.raises(nats.errors.TimeoutError):
            await watch.next_msg(timeout=0.5)
    finally:
        await router.close()
        await other.close()


@pytest.mark.parametrize("name", ["edge", "authz", "router", "auditor", "invoker"])
async def test_no_service_credential_can_rewrite_or_squat_an_endpoints_durable(admin: Client, stack: WorkerSettings,
                                                                              name: str) -> None:
    """Found by a hostile review: a service could update `invoker_<endpoint>`'s filter through its
    reader-create right (any name) and stop every model call, or squat a future endpoint's name."""
    js = admin.jetstream()
    before = (await js.consumer_info(S, "invoker_local-llama")).config
    errors: list[str] = []
    nc = await _connect_as(stack, name, errors)
    try:
        config = {"stream_name": S, "config": {"durable_name": "invoker_local-llama", "name": "invoker_local-llama",
                                                "filter_subject": "gw.evt.policy.activated", "ack_policy": "explicit",
                                                "deliver_policy": "all"}}
        subject = f"{API}.CONSUMER.CREATE.{S}.invoker_local-llama.gw.evt.policy.activated"
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(subject, json.dumps(config).encode(), timeout=1)
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert _refused(errors, "publish", subject)
    after = (await js.consumer_info(S, "invoker_local-llama")).config
    assert (after.filter_subject, after.deliver_subject) == (before.filter_subject, before.deliver_subject)
