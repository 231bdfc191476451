"""Router, invoker, edge and auditor deciders as pure functions."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatMessage, StreamChunk
from enclave_gateway.schemas.events import (
    BudgetRejected,
    BudgetReserved,
    InvocationCompleted,
    InvocationFailed,
    RequestDenied,
    RequestSubmitted,
    RouteSelected,
    RouteUnavailable,
    envelope,
)
from enclave_gateway.schemas.policy import Catalog, ModelEntry, PolicyBundle
from enclave_gateway.services import catalog
from enclave_gateway.services.auditor import decider as auditor
from enclave_gateway.services.edge import decider as edge
from enclave_gateway.services.edge import openai_shapes
from enclave_gateway.services.invoker import decider as invoker
from enclave_gateway.services.policy import PolicyError, load_bundle
from enclave_gateway.services.router import decider as router

from .samples import SAMPLES_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = load_bundle(ROOT / "policies")
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
KEY = b"k" * 32


def reserved(model: str, requested: str) -> BudgetReserved:
    base = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(base, BudgetReserved)
    return msgspec.structs.replace(base, model_id=model, chat=msgspec.structs.replace(base.chat, model=requested))


@pytest.mark.parametrize("requested, model, substituted", [
    ("enclave-tiny", "enclave-tiny", None),
    ("tiny", "enclave-tiny", "tiny"),
    ("enclave-tiny-v0", "enclave-tiny", "enclave-tiny-v0"),
])
def test_router_records_substitutions(requested: str, model: str, substituted: str | None) -> None:
    [event] = router.decide(reserved(model, requested), router.initial_state(), BUNDLE, NOW)
    assert isinstance(event, RouteSelected)
    assert (event.model_id, event.substituted_from, event.endpoint) == (model, substituted, "local-llama")
    assert event.max_tokens == 8 and event.reservation.micros == 272


def test_router_refuses_a_model_the_catalog_retired() -> None:
    retired = msgspec.structs.replace(BUNDLE, catalog=Catalog(model=tuple(
        msgspec.structs.replace(m, status="retired") if m.id == "enclave-tiny" else m for m in BUNDLE.catalog.model)))
    [event] = router.decide(reserved("enclave-tiny", "enclave-tiny"), router.initial_state(), retired, NOW)
    assert isinstance(event, RouteUnavailable) and event.reservation.micros == 272


def test_catalog_resolution_follows_deprecation_chains_and_refuses_cycles_gracefully() -> None:
    a = ModelEntry(id="a", endpoint="e", context_length=10, default_max_tokens=1, prompt_micros_per_1k=1,
                   completion_micros_per_1k=1, status="deprecated", replacement="b")
    b = msgspec.structs.replace(a, id="b", replacement="a")
    res = catalog.resolve(Catalog(model=(a, b)), "a")
    assert res is not None and res.model.id in {"a", "b"}
    assert catalog.resolve(Catalog(model=(a,)), "zzz") is None


def test_cost_rounds_up_per_side() -> None:
    m = catalog.find(BUNDLE.catalog, "enclave-tiny")
    assert m is not None
    assert catalog.cost_micros(m, 1, 1) == 2 + 6
    assert catalog.cost_micros(m, 1000, 0) == m.prompt_micros_per_1k


def route() -> RouteSelected:
    r = SAMPLES_BY_NAME["RouteSelected"]
    assert isinstance(r, RouteSelected)
    return r


def test_invoker_sends_the_reserved_bound_as_max_tokens() -> None:
    body = msgspec.json.decode(invoker.request_body(route()))
    assert body["max_tokens"] == 8 and body["model"] == "enclave-tiny"
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert "seed" not in body


OK_BODY = (b'{"choices":[{"message":{"role":"assistant","content":"o o"},"finish_reason":"length"}],'
           b'"usage":{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28}}')


@pytest.mark.parametrize("outcome, expected", [
    (invoker.CallAnswered(status=200, body=OK_BODY, latency_ms=3.0), "completed"),
    (invoker.CallAnswered(status=500, body=b"boom", latency_ms=3.0), "http_500"),
    (invoker.CallAnswered(status=200, body=b"{}", latency_ms=3.0), "bad_response"),
    (invoker.CallAnswered(status=200, body=b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
                          latency_ms=3.0), "bad_response"),
    (invoker.CallFailed(error="timeout", detail="60s", latency_ms=60000.0), "timeout"),
])
def test_invoker_outcomes(outcome: invoker.CallOutcome, expected: str) -> None:
    [event] = invoker.decide(route(), outcome, "pv", NOW)
    if expected == "completed":
        assert isinstance(event, InvocationCompleted)
        assert (event.prompt_tokens, event.completion_tokens, event.content) == (20, 8, "o o")
    else:
        assert isinstance(event, InvocationFailed) and event.error == expected
        # one failed attempt, not the end: it carries what the router needs to route it again
        assert not event.final and (event.attempt, event.tried, event.chat) == (2, ("gpu-node-1",), route().chat)
    assert event.reservation == route().reservation and event.event_id.endswith(":invoke-2")  # the sample's 2nd try


@pytest.mark.parametrize("body, needle", [
    (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}', "max_tokens"),
    (b'{"model":"","messages":[{"role":"user","content":"x"}]}', "model"),
    (b'{"model":"m","messages":"x"}', "messages"),
    (b"[]", "Expected `object`"),
])
def test_edge_refuses_invalid_openai_requests(body: bytes, needle: str) -> None:
    with pytest.raises(codec.DecodeError, match=needle):
        edge.parse_openai_request(body)


def test_edge_takes_max_completion_tokens_and_ignores_unknown_fields() -> None:
    req = edge.parse_openai_request(b'{"model":"m","messages":[{"role":"user","content":"x"}],'
                                    b'"max_completion_tokens":7,"user":"u","logprobs":false}')
    assert edge.to_chat(req).max_tokens == 7


@pytest.mark.parametrize("name, code, status", [
    ("RequestDenied", "model_forbidden", 403),
    ("BudgetRejected", "rate_limited", 429),  # the sample is a rate refusal (issue 12)
    ("RouteUnavailable", "route_unavailable", 503),
    ("InvocationFailed", "invocation_failed", 502),
    ("RequestFailed", "request_failed", 500),
])
def test_every_terminal_refusal_becomes_an_openai_error(name: str, code: str, status: int) -> None:
    event = SAMPLES_BY_NAME[name]
    reply = edge.reply_for(event)  # type: ignore[arg-type]
    assert reply.error is not None and reply.error.code == code and reply.completion is None
    got_status, body = openai_shapes.openai_error(reply.error)
    assert got_status == status and body.error.code == code
    if isinstance(event, BudgetRejected):
        assert body.error.retry_after_s == 27 and body.error.rule == "rate-limit-application"
        money = edge.reply_for(msgspec.structs.replace(event, reason="budget_exceeded", rates=(), retry_after_s=None))
        assert money.error is not None and openai_shapes.openai_error(money.error)[0] == 402
        assert (money.error.remaining_micros, money.error.requested_micros) == (10, 272)
    if isinstance(event, RequestDenied):
        assert body.error.rule == "team-model-access"


def test_completion_reply_carries_usage_and_the_held_amount() -> None:
    reply = edge.reply_for(SAMPLES_BY_NAME["InvocationCompleted"])  # type: ignore[arg-type]
    assert reply.completion is not None and reply.completion.usage.completion_tokens == 8
    assert reply.completion.reserved_micros == 272
    events = openai_shapes.ChunkWriter(0, include_usage=False).events(reply)  # no token came before it
    bodies = [msgspec.json.decode(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]\n\n" and bodies[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(b["choices"][0]["delta"].get("content", "") for b in bodies) == "o o o"
    assert bodies[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in bodies[-1]


def _sse(events: list[bytes]) -> list[dict[str, object]]:
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [msgspec.json.decode(e[6:]) for e in events if e != b"data: [DONE]\n\n"]


def test_streamed_tokens_go_out_as_they_come_and_the_reply_brings_only_what_they_missed() -> None:
    reply = edge.reply_for(SAMPLES_BY_NAME["InvocationCompleted"])  # type: ignore[arg-type]
    rid = reply.request_id
    writer = openai_shapes.ChunkWriter(0, include_usage=True)
    first = writer.events(StreamChunk(request_id=rid, model="enclave-tiny", attempt=2, index=0, content="o "))
    assert [b["choices"][0]["delta"] for b in _sse(first)] == [{"role": "assistant"}, {"content": "o "}]
    second = writer.events(StreamChunk(request_id=rid, model="enclave-tiny", attempt=2, index=1, content="o"))
    stale = writer.events(StreamChunk(request_id=rid, model="enclave-tiny", attempt=1, index=2, content="zz"))
    assert stale == []  # an earlier attempt's token never reaches the caller
    last = writer.events(reply)  # one token ("" o") trailed the reply on its own subject
    assert last[-1] == b"data: [DONE]\n\n"
    bodies = _sse(first + second + last)
    text = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"])  # type: ignore
    assert text == "o o o" and {b["model"] for b in bodies} == {"enclave-tiny"}
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 8,
                                                                   "total_tokens": 28}


def test_a_failure_after_tokens_went_out_is_an_error_event_in_the_stream() -> None:
    writer = openai_shapes.ChunkWriter(0, include_usage=True)
    writer.events(StreamChunk(request_id="r1", model="m", attempt=1, index=0, content="o"))
    refusal = edge.reply_for(SAMPLES_BY_NAME["RequestFailed"])  # type: ignore[arg-type]
    events = writer.events(refusal)
    assert len(events) == 1 and _sse(events)[0]["error"]["code"] == "request_failed"  # type: ignore[index]


def test_auditor_rows_hold_digests_not_text_and_chain_in_order() -> None:
    state = auditor.initial_state()
    rows = []
    for seq, name in enumerate(["RequestSubmitted", "InvocationCompleted", "BudgetSettled"], start=1):
        event = SAMPLES_BY_NAME[name]
        row, state = auditor.row_for(state, seq, subjects.for_event(event), codec.encode(event), NOW, KEY)
        rows.append(row)
    assert rows[0].prompt_hmac and "hello" not in msgspec.json.encode(rows[0]).decode()
    assert rows[1].completion_hmac and rows[1].completion_tokens == 8
    assert rows[2].charged_micros == 100 and rows[2].team == "alpha"
    misplaced, _ = auditor.row_for(state, 4, "gw.evt.request.failed", codec.encode(SAMPLES_BY_NAME["BudgetSettled"]),
                                   NOW, KEY)
    assert misplaced.type == "Undecodable" and misplaced.charged_micros is None  # recorded, never counted
    assert "belongs on" in (misplaced.detail or "")
    head = auditor.GENESIS
    for row in rows:
        head = auditor.chain(head, row.seq, row.subject, row.data_sha256)
        assert row.chain_hash == head


def test_auditor_keeps_a_row_for_undecodable_bytes() -> None:
    row, state = auditor.row_for(auditor.initial_state(), 9, "gw.evt.request.submitted", b"\x00junk", NOW, KEY)
    assert row.type == "Undecodable" and row.detail and state.seq == 9


def test_an_invalid_policy_bundle_is_refused_with_the_reason(tmp_path: Path) -> None:
    for f in (ROOT / "policies").iterdir():
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "catalog.toml").write_text((ROOT / "policies" / "catalog.toml").read_text() + "\ntypo = 1\n")
    with pytest.raises(PolicyError, match="typo"):
        load_bundle(tmp_path)
    (tmp_path / "budgets.toml").unlink()
    with pytest.raises(PolicyError, match="budgets.toml"):
        load_bundle(tmp_path)


def test_prompt_digests_are_keyed_and_cover_roles_and_boundaries() -> None:
    """A plain sha256 let anyone holding the Parquet confirm a guessed prompt (issue 9 item 4)."""
    event = SAMPLES_BY_NAME["RequestSubmitted"]
    assert isinstance(event, RequestSubmitted)
    row, _ = auditor.row_for(auditor.initial_state(), 1, subjects.for_event(event), codec.encode(event), NOW, KEY)
    guess = "".join(m.content for m in event.chat.messages)
    plain = {hashlib.sha256(guess.encode()).hexdigest(),
             hashlib.sha256(auditor.canonical_messages(event.chat.messages)).hexdigest()}
    assert row.prompt_hmac not in plain
    assert row.prompt_hmac == auditor.keyed_digest(KEY, auditor.canonical_messages(event.chat.messages))
    other, _ = auditor.row_for(auditor.initial_state(), 1, subjects.for_event(event), codec.encode(event), NOW,
                               b"x" * 32)
    assert other.prompt_hmac != row.prompt_hmac  # another deployment's key, another digest
    split = (ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b"))
    joined = (ChatMessage(role="user", content="ab"),)
    system = (ChatMessage(role="system", content="ab"),)
    digests = {auditor.keyed_digest(KEY, auditor.canonical_messages(m)) for m in (split, joined, system)}
    assert len(digests) == 3


def test_no_model_server_text_reaches_the_parquet() -> None:
    failed = msgspec.structs.replace(SAMPLES_BY_NAME["InvocationFailed"], detail="<html>upstream says: secret</html>")
    row, _ = auditor.row_for(auditor.initial_state(), 1, subjects.for_event(failed), codec.encode(failed), NOW, KEY)
    assert "secret" not in msgspec.json.encode(row).decode()
    gave_up = msgspec.structs.replace(SAMPLES_BY_NAME["RequestFailed"], detail="ClientError('body: secret')")
    row, _ = auditor.row_for(auditor.initial_state(), 2, subjects.for_event(gave_up), codec.encode(gave_up), NOW, KEY)
    assert "secret" not in msgspec.json.encode(row).decode()


@pytest.mark.parametrize("name", ["BudgetReserved", "InvocationFailed"])
def test_the_router_routes_each_attempt_once(name: str) -> None:
    cause = SAMPLES_BY_NAME[name]
    assert isinstance(cause, BudgetReserved | InvocationFailed)
    policy = _two_endpoints("gpu-node-1", "local-llama", "gpu-node-2")
    state = router.evolve(router.initial_state(), SAMPLES_BY_NAME["RouteSelected"])  # the failed attempt's route
    decided = router.decide(cause, state, policy, NOW)
    assert decided
    for event in decided:
        state = router.evolve(state, event)
    assert router.decide(cause, state, policy, NOW) == []


def _two_endpoints(*endpoints: str) -> PolicyBundle:
    tiny = catalog.find(BUNDLE.catalog, "enclave-tiny")
    assert tiny is not None
    models = tuple(msgspec.structs.replace(m, endpoint="", endpoints=endpoints) if m.id == "enclave-tiny" else m
                   for m in BUNDLE.catalog.model)
    return msgspec.structs.replace(BUNDLE, catalog=msgspec.structs.replace(BUNDLE.catalog, model=models))


def _fail(route: RouteSelected, error: str = "unknown_endpoint") -> InvocationFailed:  # not retried
    [failed] = invoker.decide(route, invoker.CallFailed(error=error, detail="", latency_ms=1.0), "pv", NOW)
    assert isinstance(failed, InvocationFailed)
    return failed


def test_a_failed_attempt_is_routed_to_the_next_endpoint_until_none_is_left() -> None:
    """Issue 10 item 3: every fallback is a decision, made from the route of the failed attempt."""
    policy = _two_endpoints("node-a", "node-b")
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected) and (first.endpoint, first.attempt, first.tried) == ("node-a", 1, ())
    state = router.evolve(router.initial_state(), first)
    [second] = router.decide(_fail(first), state, policy, NOW)
    assert isinstance(second, RouteSelected) and (second.endpoint, second.attempt, second.tried) == (
        "node-b", 2, ("node-a",))
    assert second.event_id.endswith(":route-2") and second.chat == first.chat and second.reservation == first.reservation
    state = router.evolve(state, second)
    [ended] = router.decide(_fail(second), state, policy, NOW)
    assert isinstance(ended, RouteUnavailable) and "node-a, node-b" in ended.detail
    assert ended.reason == "invocation_failed"
    assert ended.event_id.endswith(":route-3")
    state = router.evolve(state, ended)
    assert router.decide(_fail(second), state, policy, NOW) == []  # the end, decided once


def test_a_failure_of_no_route_of_ours_is_never_routed_from_what_it_says() -> None:
    """Found by a hostile review: the invoker's credential published a failure of a request that was
    never submitted, with a chat and an inbox of its choosing, and the router ran it. Now the next
    attempt is built from the router's own route, and a failure that matches none routes nothing."""
    policy = _two_endpoints("node-a", "node-b")
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected)
    forged = msgspec.structs.replace(_fail(first), chat=msgspec.structs.replace(first.chat, model="other"),
                                     reply_to="_INBOX_app.mallory.1")
    assert router.decide(forged, router.initial_state(), policy, NOW) == []  # no route of ours
    assert router.unknown_attempt(forged, router.initial_state(), NOW)
    state = router.evolve(router.initial_state(), first)
    wrong_endpoint = msgspec.structs.replace(forged, endpoint="node-b")
    assert router.decide(wrong_endpoint, state, policy, NOW) == [] and router.unknown_attempt(wrong_endpoint, state, NOW)
    [second] = router.decide(forged, state, policy, NOW)  # the real attempt's failure: routed as recorded
    assert isinstance(second, RouteSelected)
    assert (second.chat, second.reply_to) == (first.chat, first.reply_to)  # not what the failure claimed


def test_a_failure_that_ended_its_request_is_not_routed_again() -> None:
    old = msgspec.structs.replace(SAMPLES_BY_NAME["InvocationFailed"], final=True)
    assert isinstance(old, InvocationFailed)
    assert router.decide(old, router.initial_state(), _two_endpoints("a", "b", "c"), NOW) == []


@pytest.mark.parametrize("name", ["RequestDenied", "BudgetRejected", "RouteUnavailable", "InvocationCompleted",
                                  "InvocationFailed", "RequestFailed"])
def test_the_edge_records_a_request_outcome_once(name: str) -> None:
    terminal = msgspec.structs.replace(SAMPLES_BY_NAME[name], reply_to="_INBOX_app.tester.abc")
    if isinstance(terminal, InvocationFailed):  # one that ends its request (what a v1 failure was)
        assert edge.decide(terminal, edge.initial_state(), "v", NOW) == []  # an attempt routed again: no answer
        terminal = msgspec.structs.replace(terminal, final=True)
    state = edge.initial_state()
    decided = edge.decide(terminal, state, "v", NOW)  # type: ignore[arg-type]
    assert decided
    for event in decided:
        state = edge.evolve(state, event)
    assert edge.decide(terminal, state, "v", NOW) == []  # type: ignore[arg-type]


def _done(route: RouteSelected, at: datetime) -> InvocationCompleted:
    [completed] = invoker.decide(route, invoker.CallAnswered(status=200, body=OK_BODY, latency_ms=1.0), "pv", at)
    assert isinstance(completed, InvocationCompleted)
    return completed


def test_an_endpoint_that_keeps_failing_is_avoided_then_tried_again_as_its_failures_age_out() -> None:
    """Issue 10 item 3: the circuit breaker, folded from failed attempts, driven by the decision's clock;
    a failure dated in the future or copied counts for nothing more."""
    policy = _two_endpoints("node-a", "node-b")
    routing = policy.catalog.routing
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    state = router.initial_state()
    for i in range(routing.breaker_failures):
        [route] = router.decide(msgspec.structs.replace(reserved, request_id=f"r{i}"), state, policy, NOW)
        assert isinstance(route, RouteSelected) and route.endpoint == "node-a" and route.circuit_open == ()
        state = router.evolve(state, msgspec.structs.replace(_fail(route), occurred_at=NOW))
    [avoided] = router.decide(msgspec.structs.replace(reserved, request_id="open"), state, policy, NOW)
    assert isinstance(avoided, RouteSelected) and (avoided.endpoint, avoided.circuit_open) == ("node-b", ("node-a",))
    later = NOW + timedelta(seconds=routing.breaker_cooldown_s)
    [probe] = router.decide(msgspec.structs.replace(reserved, request_id="probe"), state, policy, later)
    assert isinstance(probe, RouteSelected) and (probe.endpoint, probe.circuit_open) == ("node-a", ())  # half-open
    assert not router.circuit_open(state.breakers["node-a"], policy, later)
    one = msgspec.structs.replace(_fail(probe), occurred_at=later)
    future = msgspec.structs.replace(one, event_id="x:invoke-9", occurred_at=later + timedelta(days=3650))
    for event in (one, one, one, future):  # a copy counts once, a date ahead of the clock not at all
        state = router.evolve(state, event)
    assert router.failures_within(state.breakers["node-a"], policy, later) == 1


def test_when_every_endpoint_is_open_the_first_is_probed_and_replay_re_decides_from_the_record() -> None:
    policy = _two_endpoints("node-a", "node-b")
    failing = router.Breaker(failures=tuple((NOW, f"f{i}") for i in range(policy.catalog.routing.breaker_failures)))
    state = router.RouterState(breakers={"node-a": failing, "node-b": failing})
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [route] = router.decide(reserved, state, policy, NOW)
    assert isinstance(route, RouteSelected) and (route.endpoint, route.circuit_open) == ("node-a", ("node-a", "node-b"))
    for decided in (route, router.decide(reserved, router.initial_state(), policy, NOW)[0]):
        assert isinstance(decided, RouteSelected)
        assert router.decide(reserved, router.as_recorded(decided, policy), policy, NOW) == [decided]


def test_a_failure_that_may_pass_is_retried_on_the_same_endpoint_with_backoff_then_moved_on() -> None:
    """Issue 10 item 3: retries with exponential backoff and a jitter replay reproduces, inside the
    deadline; an open circuit stops a retry, and the route says so."""
    policy = _two_endpoints("node-a", "node-b")
    routing = policy.catalog.routing
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved) and routing.retries_per_endpoint == 1
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected)
    state = router.evolve(router.initial_state(), first)
    [again] = router.decide(_fail(first, "http_503"), state, policy, NOW)
    assert isinstance(again, RouteSelected) and (again.endpoint, again.attempt, again.tried) == (
        "node-a", 2, ("node-a",))
    assert again.not_before is not None and timedelta(milliseconds=routing.retry_backoff_ms * 0.5) <= (
        again.not_before - NOW) < timedelta(milliseconds=routing.retry_backoff_ms * 1.5)
    assert router.decide(_fail(first, "http_503"), router.evolve(router.initial_state(), first), policy, NOW) == [
        again]  # the jitter is the request's own: the same on every replica and in replay
    state = router.evolve(state, again)
    [moved] = router.decide(_fail(again, "timeout"), state, policy, NOW)  # its one retry is used up
    assert isinstance(moved, RouteSelected) and (moved.endpoint, moved.not_before) == ("node-b", None)
    for error in ("http_404", "egress_refused", "unknown_endpoint"):  # would fail the same way again
        [onward] = router.decide(_fail(first, error), router.evolve(router.initial_state(), first), policy, NOW)
        assert isinstance(onward, RouteSelected) and onward.endpoint == "node-b"
    hurried = msgspec.structs.replace(first, deadline_at=NOW + timedelta(milliseconds=10))
    [onward] = router.decide(_fail(hurried, "unreachable"), router.evolve(router.initial_state(), hurried), policy,
                             NOW)
    assert isinstance(onward, RouteSelected) and onward.endpoint == "node-b"  # no backoff past the deadline
    failing = router.Breaker(failures=tuple((NOW, f"f{i}") for i in range(routing.breaker_failures)))
    broken = router.RouterState(routes=router.Routes().add(first), breakers={"node-a": failing})
    [around] = router.decide(_fail(first, "unreachable"), broken, policy, NOW)
    assert isinstance(around, RouteSelected) and (around.endpoint, around.circuit_open) == ("node-b", ("node-a",))
    assert router.decide(_fail(first, "unreachable"), router.as_recorded(around, policy, first), policy, NOW) == [
        around]  # replay decides it again on the recorded figures


def test_routes_in_flight_are_kept_without_copying_them_all_per_route() -> None:
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    first = router.decide(reserved, router.initial_state(), BUNDLE, NOW)[0]
    assert isinstance(first, RouteSelected)
    first = msgspec.structs.replace(first, deadline_at=None)  # v1: kept ROUTES_KEPT
    routes = router.Routes()
    count = router.ROUTES_RECENT * 37 + 5
    for i in range(count):
        at = NOW + timedelta(milliseconds=100 * i)  # all within the hour
        routes = routes.add(msgspec.structs.replace(first, request_id=f"r{i}", occurred_at=at))
    # 37 sealed sets merge as a binary counter, but never past ROUTES_MERGED (16 sets): 16, 16, 4, 1
    assert len(routes.recent) == 5 and [len(g) for _, g in routes.generations] == [
        router.ROUTES_RECENT * n for n in (16, 16, 4, 1)]
    assert all(routes.get(f"r{i}", NOW) is not None for i in range(0, count, 97)) and routes.get("nope", NOW) is None
    newer = msgspec.structs.replace(first, request_id="r0", attempt=2, occurred_at=NOW + timedelta(seconds=count // 10))
    assert routes.add(newer).get("r0", NOW) == newer  # the newest route of a request wins
    late_at = NOW + router.ROUTES_KEPT + router.DROP_MARGIN + timedelta(seconds=count // 10 + 1)
    later = routes.add(msgspec.structs.replace(first, request_id="late", occurred_at=late_at))
    assert later.get("r0", NOW) is None and later.get("late", late_at) is not None  # an hour on, the old ones are gone
    assert not later.generations  # every sealed route was past its keep-until: dropped whole


def test_a_route_is_kept_until_its_deadline_and_a_grace_then_found_by_no_one_and_dropped() -> None:
    """The soak saw routes kept an hour grow the router by ~1.4 KB a request: a route is needed only
    until its request's deadline (then a failure ends it as `timeout`) and ROUTE_GRACE after."""
    policy = _two_endpoints("node-a", "node-b")
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved) and reserved.deadline_at is not None
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected) and first.deadline_at == reserved.deadline_at
    state = router.evolve(router.initial_state(), first)
    failed = _fail(first)
    within = first.deadline_at + router.ROUTE_GRACE  # type: ignore[operator]
    [ended] = router.decide(failed, state, policy, within)
    assert isinstance(ended, RouteUnavailable) and ended.reason == "timeout"
    past = within + timedelta(microseconds=1)
    # past the grace the request is over (the budget ended it at its deadline): nothing is routed,
    # and the failure is not waited for as one of a route not yet read
    assert router.decide(failed, state, policy, past) == [] and not router.unknown_attempt(failed, state, past)
    routes = state.routes
    for i in range(router.ROUTES_RECENT * 2):  # seal the first route into a generation
        routes = routes.add(msgspec.structs.replace(first, request_id=f"r{i}"))
    assert routes.generations and routes.get(first.request_id, NOW) == first
    dropped = routes.add(msgspec.structs.replace(first, request_id="late", occurred_at=past + router.DROP_MARGIN,
                                                 deadline_at=past + timedelta(minutes=2)))
    assert not dropped.generations and dropped.get(first.request_id, NOW) is None  # the memory is given back


def test_a_weighted_model_spreads_first_attempts_by_weight_the_same_way_every_time() -> None:
    """Issue 10 item 2 (in part): load spread over a model's servers, decided from the request id."""
    policy = _two_endpoints("node-a", "node-b")
    models = tuple(msgspec.structs.replace(m, strategy="weighted", weights=(3, 1)) if m.id == "enclave-tiny" else m
                   for m in policy.catalog.model)
    policy = msgspec.structs.replace(policy, catalog=msgspec.structs.replace(policy.catalog, model=models))
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    picks = []
    for i in range(4000):
        [route] = router.decide(msgspec.structs.replace(reserved, request_id=f"r{i}"), router.initial_state(),
                                policy, NOW)
        assert isinstance(route, RouteSelected)
        picks.append(route.endpoint)
    assert 0.72 < picks.count("node-a") / len(picks) < 0.78  # 3:1
    again = router.decide(msgspec.structs.replace(reserved, request_id="r7"), router.initial_state(), policy, NOW)
    assert again[0].endpoint == picks[7]  # type: ignore[union-attr]  # the same on every replica and in replay


# What llama-cpp-python's server streams (one token a chunk, no usage even when asked), and what
# vLLM or llama.cpp's own server add: a usage chunk with no choices.
LLAMA_STREAM = [b'data: {"choices":[{"delta":{"role":"assistant"},"finish_reason":null}]}', b"",
                b": ping", b'data: {"choices":[{"delta":{"content":" o"},"finish_reason":null}]}', b"",
                b'data: {"choices":[{"delta":{"content":" o"},"finish_reason":null}]}',
                b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}', b"data: [DONE]", b""]


def _read(lines: list[bytes]) -> tuple[list[str], invoker.StreamReader]:
    reader, sent = invoker.StreamReader(), []
    for i, line in enumerate(lines):
        if (text := reader.feed(line + b"\n", float(i))) is not None:
            sent.append(text)
        if reader.done:
            break
    return sent, reader


def test_a_streamed_answer_without_usage_is_counted_by_the_gateway() -> None:
    streaming = msgspec.structs.replace(route(), chat=msgspec.structs.replace(route().chat, stream=True))
    body = msgspec.json.decode(invoker.request_body(streaming))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    sent, reader = _read(LLAMA_STREAM)
    assert sent == [" o", " o"] and reader.first_token_ms == 3.0
    [done] = invoker.decide(streaming, reader.outcome(7.0), "pv", NOW)
    assert isinstance(done, InvocationCompleted) and done.streamed and not done.usage_reported
    # it stopped at the limit: it made all the tokens it was allowed, whatever chunks they came in
    assert (done.content, done.completion_tokens, done.finish_reason) == (" o o", streaming.max_tokens, "length")
    # the prompt as an upper bound: its bytes ("user" + "hello") plus the template's overheads
    assert done.prompt_tokens == len(b"user") + len(b"hello") + 8 + 16


def test_a_streamed_answer_with_usage_keeps_the_servers_figures() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}'
    _, reader = _read([*LLAMA_STREAM[:-2], usage, b"data: [DONE]"])
    [done] = invoker.decide(route(), reader.outcome(7.0), "pv", NOW)
    assert isinstance(done, InvocationCompleted) and done.usage_reported
    assert (done.prompt_tokens, done.completion_tokens) == (11, 2)


@pytest.mark.parametrize("bad", [b'data: {"error":{"message":"out of memory"}}', b"data: {not json",
                                 b'data: {"choices":[{"delta":{"content":"\xff"}}]}'])
def test_a_stream_that_breaks_after_tokens_went_out_is_the_answer_cut_short_and_charged(bad: bytes) -> None:
    """Found by a hostile review: a stream broken after tokens went out (by the server, or by the
    caller's own short deadline) was released unpaid. Those tokens are what the caller got: they are
    recorded and charged, and no other endpoint starts the answer again (no failure to route)."""
    reader = invoker.StreamReader()
    reader.feed(LLAMA_STREAM[3], 1.0)
    with pytest.raises(invoker.StreamBroken):
        reader.feed(bad, 2.0)
    [done] = invoker.decide(route(), reader.broken("bad_response", "mid-stream", 3.0), "pv", NOW)
    assert isinstance(done, InvocationCompleted) and done.finish_reason == "interrupted"
    assert done.content == " o" and done.completion_tokens == 2 and done.broken_off == "bad_response: mid-stream"
    # before any token went out it is an ordinary failed attempt: the next endpoint may serve it
    [failed] = invoker.decide(route(), invoker.StreamReader().broken("timeout", "t", 3.0), "pv", NOW)
    assert isinstance(failed, InvocationFailed) and failed.error == "timeout"


def test_a_streamed_attempt_delivered_again_is_not_started_anywhere_again() -> None:
    """Found by a hostile review: a redelivered streamed route was called again and the caller read
    the tokens twice. The invoker refuses it (stream_broken) and the router ends the request, even
    with an endpoint left and even past the deadline (the reason is the redelivery)."""
    policy = _two_endpoints("node-a", "node-b")
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected)
    again = invoker.CallFailed(error="stream_broken", detail="delivered again", latency_ms=0.0)
    [failed] = invoker.decide(first, again, "pv", NOW)
    assert isinstance(failed, InvocationFailed)
    late = NOW + timedelta(days=1)
    [ended] = router.decide(failed, router.evolve(router.initial_state(), first), policy, late)
    assert isinstance(ended, RouteUnavailable) and ended.reason == "invocation_failed"
    assert "delivered again" in ended.detail


@pytest.mark.parametrize("body, why", [
    (b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":10,"completion_tokens":-1000000}}',
     "Expected `int` >= 0"),
    (b'{"choices":[{"message":{"content":"\xff"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}', "utf-8"),
    (b'{"choices":[{"message":{"content":"' + b"x" * (invoker.MAX_ANSWER_BYTES + 1) +
     b'"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}', "an answer over"),
])
def test_a_server_answer_that_would_credit_crash_or_overflow_is_a_bad_response(body: bytes, why: str) -> None:
    [failed] = invoker.decide(route(), invoker.CallAnswered(status=200, body=body, latency_ms=1.0), "pv", NOW)
    assert isinstance(failed, InvocationFailed) and failed.error == "bad_response" and why.lower() in failed.detail.lower()
    negative = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":-5}}'
    with pytest.raises(invoker.StreamBroken):
        invoker.StreamReader().feed(negative, 1.0)


def test_a_server_reporting_fewer_tokens_than_it_streamed_is_not_believed() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":0}}'
    _, reader = _read([*LLAMA_STREAM[:-2], usage, b"data: [DONE]"])
    [done] = invoker.decide(route(), reader.outcome(7.0), "pv", NOW)
    assert isinstance(done, InvocationCompleted) and (done.prompt_tokens, done.completion_tokens) == (11, 2)


def test_the_edge_drops_repeated_tokens_and_tells_an_interrupted_answer_as_an_error() -> None:
    reply = edge.reply_for(SAMPLES_BY_NAME["InvocationCompleted"])  # type: ignore[arg-type]
    assert reply.completion is not None
    writer = openai_shapes.ChunkWriter(0, include_usage=True)
    chunk = StreamChunk(request_id=reply.request_id, model="m", attempt=2, index=0, content="o o")
    assert len(writer.events(chunk)) == 2 and writer.events(chunk) == []  # the same token again: dropped
    cut = msgspec.structs.replace(reply, completion=msgspec.structs.replace(reply.completion,
                                                                             finish_reason="interrupted"))
    bodies = _sse(writer.events(cut))
    assert bodies[-1]["error"]["code"] == "invocation_failed" and "usage" in bodies[-2]  # type: ignore[index]
    other = openai_shapes.ChunkWriter(0, include_usage=False)
    other.events(msgspec.structs.replace(chunk, content="zz"))
    assert _sse(other.events(reply))[-1]["error"]["code"] == "invocation_failed"  # type: ignore[index]


def test_a_stream_that_ends_without_saying_why_is_broken_not_a_short_answer() -> None:
    # llama-cpp-python cuts a stream short with `[DONE]` and no finish reason when another request comes
    _, reader = _read([LLAMA_STREAM[0], LLAMA_STREAM[3], b"data: [DONE]"])
    with pytest.raises(invoker.StreamBroken, match="without a finish reason"):
        reader.outcome(3.0)


def _strategic(strategy: str = "ordered", allowed: tuple[str, ...] = (), costs: tuple[int, ...] = ()) -> PolicyBundle:
    models = tuple(msgspec.structs.replace(m, endpoint="", endpoints=("node-a", "node-b", "node-c"), strategy=strategy,
                                           strategies_allowed=allowed, costs=costs)
                   if m.id == "enclave-tiny" else m for m in BUNDLE.catalog.model)
    return msgspec.structs.replace(BUNDLE, catalog=msgspec.structs.replace(BUNDLE.catalog, model=models))


def _asking(strategy: str | None) -> BudgetReserved:
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    return msgspec.structs.replace(reserved, chat=msgspec.structs.replace(reserved.chat, strategy=strategy))


def test_cheapest_tries_the_lowest_cost_endpoint_first_and_records_why_it_passed_any_over() -> None:
    policy = _strategic("cheapest", costs=(5, 1, 3))
    [route] = router.decide(_asking(None), router.initial_state(), policy, NOW)
    assert isinstance(route, RouteSelected) and route.endpoint == "node-b"
    assert (route.strategy, route.candidates, route.skipped) == ("cheapest", ("node-b", "node-c", "node-a"), ())
    failing = router.Breaker(failures=tuple((NOW, f"f{i}") for i in range(3)))
    [around] = router.decide(_asking(None), router.RouterState(breakers={"node-b": failing}), policy, NOW)
    assert isinstance(around, RouteSelected) and around.endpoint == "node-c"
    assert [(s.endpoint, s.reason) for s in around.skipped] == [("node-b", "circuit_open")]


def test_latency_learns_from_completions_records_its_figures_and_replays_from_them() -> None:
    policy = _strategic("latency")
    state = router.initial_state()
    done = SAMPLES_BY_NAME["InvocationCompleted"]
    assert isinstance(done, InvocationCompleted)
    for i, (endpoint, ms) in enumerate((("node-a", 40.0), ("node-b", 9.0), ("node-a", 30.0))):
        rid = f"{i:032d}"
        state = router.evolve(state, msgspec.structs.replace(route(), request_id=rid, event_id=f"{rid}:route-2",
                                                             endpoint=endpoint))
        completed = msgspec.structs.replace(done, request_id=rid, event_id=f"{rid}:invoke-2", endpoint=endpoint,
                                            latency_ms=ms)
        state = router.evolve(router.evolve(state, completed), completed)  # read twice, counted once
    assert state.latency["node-a"].ms == 38.0  # a moving average: 40, then a fifth of the way to 30
    # found by a hostile review: completions of no route (forged by an invoker credential) move nothing
    forged = msgspec.structs.replace(done, request_id="f" * 32, event_id="f" * 32 + ":invoke", endpoint="node-c",
                                     latency_ms=0.0)
    assert router.evolve(state, forged) == state
    [chosen] = router.decide(_asking(None), state, policy, NOW)
    assert isinstance(chosen, RouteSelected) and chosen.endpoint == "node-b"
    # the fastest first; node-c was never observed, so it comes last (and is measured when tried)
    assert chosen.candidates == ("node-b", "node-a", "node-c")
    assert chosen.observed_ms == (("node-b", 9.0), ("node-a", 38.0))
    # replay has no completions to learn from: it ranks by the figures the route recorded
    assert router.decide(_asking(None), router.as_recorded(chosen, policy), policy, NOW) == [chosen]


def test_a_request_may_ask_for_a_strategy_only_where_the_catalog_allows_it() -> None:
    policy = _strategic("ordered", allowed=("cheapest",), costs=(5, 1, 3))
    [plain] = router.decide(_asking(None), router.initial_state(), policy, NOW)
    [asked] = router.decide(_asking("cheapest"), router.initial_state(), policy, NOW)
    assert isinstance(plain, RouteSelected) and (plain.endpoint, plain.strategy) == ("node-a", "ordered")
    assert isinstance(asked, RouteSelected) and (asked.endpoint, asked.strategy) == ("node-b", "cheapest")
    [refused] = router.decide(_asking("latency"), router.initial_state(), policy, NOW)
    assert isinstance(refused, RouteUnavailable) and refused.reason == "strategy_not_allowed"
    assert "cheapest" in refused.detail


def test_a_substitution_says_why() -> None:
    catalog_ = BUNDLE.catalog
    assert catalog.substitution(catalog_, "tiny", "enclave-tiny") == "alias of enclave-tiny"
    assert catalog.substitution(catalog_, "enclave-tiny-v0", "enclave-tiny") == \
        "deprecated: enclave-tiny-v0 -> enclave-tiny"
    assert catalog.substitution(catalog_, "enclave-tiny", "enclave-tiny") is None


@pytest.mark.parametrize("fields, needle", [
    ({"strategy": "cheapest"}, "give one cost"),
    ({"costs": (1, 2)}, "never routes by cost"),
    ({"strategies_allowed": ("cheapest",), "costs": (1,)}, "give one cost"),
    ({"strategies_allowed": ("weighted",)}, "weighted"),
])
def test_strategy_figures_are_validated(fields: dict[str, object], needle: str) -> None:
    from enclave_gateway.services.policy.bundle import _check_catalog as check_catalog

    base: dict[str, object] = {"endpoint": "", "endpoints": ("node-a", "node-b"), "strategies_allowed": (), "costs": ()}
    models = tuple(msgspec.structs.replace(m, **{**base, **fields})  # type: ignore[arg-type]
                   if m.id == "enclave-tiny" else m for m in BUNDLE.catalog.model)
    with pytest.raises(PolicyError, match=needle):
        check_catalog(msgspec.structs.replace(BUNDLE.catalog, model=models))


def test_two_endpoint_names_that_would_share_one_durable_are_refused() -> None:
    """Found by a hostile review: `gpu.1` and `gpu_1` are one subject token, so one durable."""
    from enclave_gateway.services.policy.bundle import _check_catalog as check_catalog

    models = tuple(msgspec.structs.replace(m, endpoint="", endpoints=("gpu.1", "gpu_1"), strategies_allowed=(),
                                           costs=()) if m.id == "enclave-tiny" else m for m in BUNDLE.catalog.model)
    with pytest.raises(PolicyError, match="share one invokers' durable"):
        check_catalog(msgspec.structs.replace(BUNDLE.catalog, model=models))


def test_an_endpoint_without_an_invoker_is_passed_over_unless_none_is_served() -> None:
    policy = _strategic("ordered")
    state = msgspec.structs.replace(router.initial_state(), unserved=frozenset({"node-a"}))
    [route] = router.decide(_asking(None), state, policy, NOW)
    assert isinstance(route, RouteSelected) and route.endpoint == "node-b"
    assert [(s.endpoint, s.reason) for s in route.skipped] == [("node-a", "no_invoker")]
    assert router.decide(_asking(None), router.as_recorded(route, policy), policy, NOW) == [route]
    nobody = msgspec.structs.replace(state, unserved=frozenset({"node-a", "node-b", "node-c"}))
    [probe] = router.decide(_asking(None), nobody, policy, NOW)
    assert isinstance(probe, RouteSelected) and probe.endpoint == "node-a" and probe.skipped == ()


def test_a_servers_refusal_of_the_request_itself_ends_it_where_the_catalog_says_so() -> None:
    """Issue 11 item 7: a prompt over the context was a 502 after every endpoint refused it in turn."""
    policy = _two_endpoints("node-a", "node-b")
    assert policy.catalog.routing.end_on_refusal  # the shipped catalog states it
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected)
    state = router.evolve(router.initial_state(), first)
    for error, reason in (("context_length_exceeded", "context_length_exceeded"), ("http_400", "invalid_request")):
        [ended] = router.decide(_fail(first, error), state, policy, NOW)
        assert isinstance(ended, RouteUnavailable) and ended.reason == reason
    # a catalog recorded before the setting existed decides as it did then: on to the next endpoint
    before = msgspec.structs.replace(policy, catalog=msgspec.structs.replace(
        policy.catalog, routing=msgspec.structs.replace(policy.catalog.routing, end_on_refusal=False)))
    [onward] = router.decide(_fail(first, "http_400"), state, before, NOW)
    assert isinstance(onward, RouteSelected) and onward.endpoint == "node-b"


def test_replay_decides_a_late_timeout_end_on_the_recorded_route_whatever_its_age() -> None:
    """Found by a hostile review: routers before keep-until held routes an hour, so a killed
    invoker's route failing minutes past its deadline was ended as `timeout`; replay decides on the
    recorded route (`as_recorded`), which no time filter may hide, or old packages stop verifying."""
    policy = _two_endpoints("node-a", "node-b")
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    assert isinstance(reserved, BudgetReserved)
    [first] = router.decide(reserved, router.initial_state(), policy, NOW)
    assert isinstance(first, RouteSelected) and first.deadline_at is not None
    late = first.deadline_at + router.ROUTE_GRACE + timedelta(minutes=3)
    failed = msgspec.structs.replace(_fail(first, "timeout"), occurred_at=late)
    recorded = RouteUnavailable(**envelope(first.request_id, "route-2", late, policy.version), caller=first.caller,
                                requested_model=first.requested_model, reason="timeout", detail="x",
                                reservation=first.reservation, reply_to=first.reply_to)
    [again] = router.decide(failed, router.as_recorded(recorded, policy, first), policy, late)
    assert isinstance(again, RouteUnavailable) and again.reason == "timeout"
    assert router.decide(failed, router.evolve(router.initial_state(), first), policy, late) == []  # live: over


def test_a_route_dated_ahead_of_the_folding_router_drops_nothing_it_still_needs() -> None:
    """Found by a hostile review: one route from a replica whose clock ran ahead (or a forged date)
    dropped every generation, and the failures of routes in flight waited for routes now gone."""
    reserved = SAMPLES_BY_NAME["BudgetReserved"]
    first = router.decide(reserved, router.initial_state(), BUNDLE, NOW)[0]
    assert isinstance(first, RouteSelected)
    routes = router.Routes()
    for i in range(router.ROUTES_RECENT * 2):
        routes = routes.add(msgspec.structs.replace(first, request_id=f"r{i}", deadline_at=NOW + timedelta(minutes=2)),
                            NOW)
    assert routes.generations
    ahead = msgspec.structs.replace(first, request_id="ahead", occurred_at=NOW + timedelta(days=1))
    assert routes.add(ahead, NOW).get("r0", NOW) is not None  # folded on this router's clock
    assert routes.add(ahead).get("r0", NOW) is None  # what the route's own date alone would have done
