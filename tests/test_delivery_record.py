"""The record tells the truth about delivery and money (issue 8, item 7).

A caller the edge gave up on (504 at its deadline) is recorded as such, and a completion that comes
later is recorded as undelivered, never as delivered; a RequestFailed after a reservation releases it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import msgspec
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitReply, SubmitRequest
from enclave_gateway.schemas.events import (
    BudgetReleased,
    BudgetReserved,
    Caller,
    InvocationCompleted,
    RequestAuthorized,
    RequestFailed,
    Reservation,
    ResponseDelivered,
    ResponseUndelivered,
    envelope,
)
from enclave_gateway.schemas.policy import Budgets, TeamBudget
from enclave_gateway.services import bus, worker
from enclave_gateway.services.authz import policy_view
from enclave_gateway.services.budget import decider as budget
from enclave_gateway.services.edge import decider as edge
from enclave_gateway.services.edge.shell import Edge
from enclave_gateway.services.policy import load_bundle
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import stream_events, wait_for_event
from .samples import SAMPLES_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PV = "p"
APP_INBOX = f"{subjects.app_inbox('tester')}.abc.1"
EDGE_INBOX = subjects.edge_reply("replica1", "0123456789abcdef0123456789abcdef")


def _terminal(reply_to: str | None, name: str = "InvocationCompleted") -> edge.Terminal:
    event = SAMPLES_BY_NAME[name]
    if name == "InvocationFailed":  # a failure the caller hears of ends its request
        event = msgspec.structs.replace(event, final=True)  # type: ignore[type-var]
    return msgspec.structs.replace(event, reply_to=reply_to)  # type: ignore[return-value,type-var]


# --- A. delivery: which fact is recorded, decided purely ---------------------------------------


@pytest.mark.parametrize("reply_to, route", [
    (APP_INBOX, "application"),
    (f"{subjects.app_inbox('tester')}.x", "application"),  # nats-py's `new_inbox()` shape
    (subjects.app_inbox("tester"), "refused"),  # an application's bare prefix: no inbox token
    (EDGE_INBOX, "edge"),
    (f"{EDGE_INBOX}.extra", "refused"),
    ("_INBOX_edge.r", "refused"),
    ("gw.evt.response.delivered", "refused"),
    ("gw.evt.request.failed", "refused"),
    ("_INBOX.abc.def", "refused"),
    ("_INBOX_app.tester.*", "refused"),
    ("_INBOX_app.tester.>", "refused"),
    ("_INBOX_app.tester..x", "refused"),
    ("_INBOX_app.tester.a b", "refused"),
    ("_INBOX_appx.tester.abc", "refused"),
    ("", "none"),
    (None, "none"),
])
def test_reply_route_allows_only_callers_inboxes(reply_to: str | None, route: str) -> None:
    assert edge.reply_route(reply_to) == route
    assert edge.reply_target(reply_to) == (reply_to if route in ("application", "edge") else None)


def test_a_batch_callers_reply_is_recorded_delivered_by_the_responder() -> None:
    [fact] = edge.decide(_terminal(APP_INBOX), edge.initial_state(), PV, NOW)
    assert isinstance(fact, ResponseDelivered)
    assert (fact.outcome, fact.code, fact.team) == ("completed", None, "alpha")
    assert fact.event_id == f"{fact.request_id}:deliver"


def test_an_http_callers_reply_is_forwarded_and_recorded_by_the_holding_replica_only() -> None:
    event = _terminal(EDGE_INBOX)
    assert edge.decide(event, edge.initial_state(), PV, NOW) == []
    assert isinstance(event, InvocationCompleted)  # its model time travels too: the added time in /metrics
    assert edge.reply_headers(event) == {edge.TEAM_HEADER: "alpha", edge.MODEL_MS_HEADER: f"{event.latency_ms:.3f}"}
    assert edge.reply_headers(_terminal(EDGE_INBOX, "InvocationFailed")) == {edge.TEAM_HEADER: "alpha"}
    assert edge.reply_headers(_terminal(APP_INBOX)) is None  # the team travels only between edge replicas


@pytest.mark.parametrize("name, reply_to, code, reason", [
    ("InvocationFailed", "gw.evt.response.delivered", "invocation_failed", "reply_subject_refused"),
    ("InvocationFailed", "_INBOX_app.tester.>", "invocation_failed", "reply_subject_refused"),
    ("InvocationFailed", "", "invocation_failed", "no_reply_subject"),
    ("RequestFailed", None, "request_failed", "no_reply_subject"),
])
def test_a_reply_with_nowhere_to_go_is_recorded_undelivered(name: str, reply_to: str | None, code: str,
                                                            reason: str) -> None:
    [fact] = edge.decide(_terminal(reply_to, name), edge.initial_state(), PV, NOW)
    assert isinstance(fact, ResponseUndelivered)
    assert (fact.outcome, fact.code, fact.reason, fact.team) == ("error", code, reason, "alpha")
    assert fact.event_id == f"{fact.request_id}:undelivered"
    assert subjects.for_event(fact) == subjects.response_undelivered()


def test_the_holding_replica_records_delivery_timeout_and_late_replies() -> None:
    rid = "r1"
    completion = edge.reply_for(msgspec.structs.replace(_terminal(EDGE_INBOX), request_id=rid))
    [got] = edge.handed_over(completion, "alpha", "waiting", NOW, PV)
    assert isinstance(got, ResponseDelivered) and (got.outcome, got.team) == ("completed", "alpha")
    [gave_up] = edge.handed_over(edge.timeout_reply(rid), None, "waiting", NOW, PV)
    assert isinstance(gave_up, ResponseDelivered) and (gave_up.outcome, gave_up.code) == ("error", "timeout")
    [late] = edge.handed_over(completion, "alpha", "gone", NOW, PV)
    assert isinstance(late, ResponseUndelivered)
    assert (late.outcome, late.code, late.reason, late.team) == ("completed", None, "caller_gone", "alpha")
    assert late.event_id != gave_up.event_id  # both facts stand: the dedup window keeps neither from the stream
    assert edge.handed_over(completion, "alpha", "answered", NOW, PV) == []  # a redelivered duplicate


# --- A. end to end: a caller the edge gave up on ----------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_reply_after_the_deadline_is_recorded_undelivered_and_nothing_runs_past_it(
        admin: Client, stack: WorkerSettings, token_for, monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge's deadline travels with the request (issue 10 item 3): past it the router starts no
    model call, the request ends with a timeout, its reservation is released, and that late end,
    which nobody waits for any more, is recorded undelivered."""
    from enclave_gateway.services.edge import shell as edge_shell

    monkeypatch.setattr(edge_shell, "REPLY_GRACE_S", 0.0)  # the edge gives up before the pipeline's own answer
    hasty = msgspec.structs.replace(stack, request_timeout_s=0.001)  # far below five acknowledged hops
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="too late"),), max_tokens=8,
                    temperature=0.0)
    async with worker.session(hasty, "edge", policy_view.for_worker(hasty)) as s:
        replica = Edge(hasty, s)  # a second edge replica; it takes no gw.submit traffic, only its callers' replies
        await replica.listen()
        reply = (await replica.call(SubmitRequest(token=token_for("gamma"), chat=chat))).reply
        assert reply.error is not None and reply.error.code == "timeout"
        rid = reply.request_id
        ended = await wait_for_event(admin, rid, "RouteUnavailable", timeout_s=60)
        late = await wait_for_event(admin, rid, "ResponseUndelivered", timeout_s=45)  # the whole stream is polled
    assert ended["reason"] == "timeout" and "deadline" in str(ended["detail"])
    assert (late["outcome"], late["reason"], late["team"], late["code"]) == ("error", "caller_gone", "gamma",
                                                                            "timeout")
    released = await wait_for_event(admin, rid, "BudgetReleased", timeout_s=30)
    events = [body for _, body in await stream_events(admin, rid)]
    types = [str(b["type"]) for b in events]
    assert "InvocationCompleted" not in types  # no model call past the deadline (the invoker refuses to start one)
    delivered = [b for b in events if b["type"] == "ResponseDelivered"]
    assert [(b["outcome"], b["code"]) for b in delivered] == [("error", "timeout")]
    assert types.count("ResponseUndelivered") == 1 and released["reason"] == "RouteUnavailable"


@pytest.mark.asyncio(loop_scope="session")
async def test_an_http_caller_answered_in_time_is_recorded_delivered_once_with_its_team(
        admin: Client, http_url: str, token_for) -> None:
    body = b'{"model": "enclave-tiny", "messages": [{"role": "user", "content": "in time"}], "max_tokens": 4}'
    headers = {"Authorization": f"Bearer {token_for('gamma')}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(f"{http_url}/v1/chat/completions", data=body,
                                                                headers=headers) as r:
        assert r.status == 200
        rid = str((await r.json())["id"]).removeprefix("chatcmpl-")
    delivered = await wait_for_event(admin, rid, "ResponseDelivered")
    assert (delivered["outcome"], delivered["team"]) == ("completed", "gamma")
    await asyncio.sleep(0.3)  # a stray second record would be written right after the first
    types = [b["type"] for _, b in await stream_events(admin, rid)]
    assert types.count("ResponseDelivered") == 1 and "ResponseUndelivered" not in types


# --- B. a failure after the reservation releases it --------------------------------------------


def _failed_at_router(original: BudgetReserved) -> RequestFailed:
    """RequestFailed exactly as `bus._fail` builds it for a message the router gave up on."""
    return RequestFailed(
        **envelope(original.request_id, "failed-at-router", NOW, original.policy_version),
        stage="router",
        reason="request_failed",
        detail="gave up after 5 attempts: RuntimeError()",
        reply_to=getattr(original, "reply_to", None),
        reservation=bus._reservation_of(original),
    )


def test_the_routers_input_yields_its_reservation() -> None:
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert bus._reservation_of(reserved) == Reservation(team="alpha", period="2026-11", micros=272)
    assert bus._reservation_of(SAMPLES_BY_NAME["RouteSelected"]) == SAMPLES_BY_NAME["RouteSelected"].reservation  # type: ignore[union-attr]
    assert bus._reservation_of(SAMPLES_BY_NAME["RequestSubmitted"]) is None


def test_a_failure_at_the_router_releases_the_reservation_at_once_and_only_once() -> None:
    policy = msgspec.structs.replace(load_bundle(ROOT / "policies"), budgets=Budgets(
        teams={"t": TeamBudget(cap_micros=1_000_000, period="month")}))
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="hello"),), max_tokens=8)
    authorized = RequestAuthorized(**envelope("r1", "authz", NOW, PV), caller=Caller(subject="s", team="t"),
                                   model_id="enclave-tiny", chat=chat, reply_to=APP_INBOX)
    state = budget.initial_state()
    [reserved] = budget.decide(authorized, state, policy, NOW)
    assert isinstance(reserved, BudgetReserved)
    state = budget.evolve(state, reserved)
    failure = _failed_at_router(reserved)
    assert budget.team_of(failure) == "t"  # without a reservation the shell would not even load the team
    [released] = budget.decide(failure, state, policy, NOW)
    assert isinstance(released, BudgetReleased)
    assert (released.amount_micros, released.reserved_micros, released.spent_micros) == (reserved.amount_micros, 0, 0)
    state = budget.evolve(state, released)
    assert budget.decide(failure, state, policy, NOW) == []  # a redelivered failure releases nothing twice
    assert "r1" not in state.open


def test_a_failure_after_settlement_releases_nothing() -> None:
    policy = msgspec.structs.replace(load_bundle(ROOT / "policies"), budgets=Budgets(
        teams={"t": TeamBudget(cap_micros=1_000_000, period="month")}))
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="hello"),), max_tokens=8)
    authorized = RequestAuthorized(**envelope("r2", "authz", NOW, PV), caller=Caller(subject="s", team="t"),
                                   model_id="enclave-tiny", chat=chat, reply_to=APP_INBOX)
    state = budget.initial_state()
    [reserved] = budget.decide(authorized, state, policy, NOW)
    assert isinstance(reserved, BudgetReserved)
    state = budget.evolve(state, reserved)
    held = bus._reservation_of(reserved)
    assert held is not None
    done = InvocationCompleted(**envelope("r2", "invoke", NOW, PV), caller=Caller(subject="s", team="t"),
                               model_id="enclave-tiny", endpoint="e", prompt_tokens=5, completion_tokens=8,
                               finish_reason="length", content="x", latency_ms=1.0, reservation=held,
                               reply_to=APP_INBOX)
    for fact in budget.decide(done, state, policy, NOW):
        state = budget.evolve(state, fact)
    assert budget.decide(_failed_at_router(reserved), state, policy, NOW) == []


@pytest.mark.asyncio(loop_scope="session")
async def test_a_batch_submission_waiting_out_an_outage_holds_up_no_other(
        stack: WorkerSettings, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py runs a subscription's callbacks one at a time: a submission whose publish waits out an
    outage (its deadline and 120 s more) once held up every batch caller behind it (a review)."""
    from nats.aio.msg import Msg

    async with worker.session(stack, "edge", policy_view.for_worker(stack)) as s:
        replica = Edge(stack, s)  # driven directly: it subscribes to nothing, so no other traffic reaches it
        stalled = asyncio.Event()

        async def submit(entry: str, cmd: SubmitRequest, reply_to: str, request_id: str) -> SubmitReply | None:
            if cmd.chat.messages[0].content == "stalled":
                stalled.set()
                await asyncio.Event().wait()  # an outage that does not end within this test
            return edge.error_reply(request_id, "audit_unavailable", "refused at once")

        monkeypatch.setattr(replica, "submit", submit)
        token = "not-read-by-this-fake"

        def message(content: str, reply: str) -> Msg:
            chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=content),))
            return Msg(_client=s.nc, subject=subjects.submit("tester"), reply=reply,
                       data=codec.encode(SubmitRequest(token=token, chat=chat)))

        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await asyncio.wait_for(replica._on_submit(message("stalled", client.new_inbox())), 5)
        await asyncio.wait_for(stalled.wait(), 5)
        await asyncio.wait_for(replica._on_submit(message("quick", inbox)), 5)
        answer = codec.decode_reply((await sub.next_msg(timeout=10)).data)
        assert answer.error is not None and answer.error.message == "refused at once"
        for task in replica.submissions:
            task.cancel()
