"""One fixed sample of every current event type: the source of the v1 golden files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events.budget import RateCount
from enclave_gateway.schemas.events.request import ContentMarking
from enclave_gateway.schemas.events.route import Skipped
from enclave_gateway.schemas.events import (
    AnyEvent,
    AuditCheckpoint,
    BudgetClockTicked,
    ConsoleViewed,
    EndpointObserved,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    Caller,
    InvocationCompleted,
    InvocationFailed,
    MessageRejected,
    PolicyActivated,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    Reservation,
    ResponseDelivered,
    ResponseUndelivered,
    RouteSelected,
    RouteUnavailable,
    envelope,
)

T = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
RID = "0123456789abcdef0123456789abcdef"
PV = "sha256:00112233aabbccdd"
CHAT = ChatBody(model="tiny", messages=(ChatMessage(role="user", content="hello"),), max_tokens=8, temperature=0.0)
CALLER = Caller(subject="alice", team="alpha", roles=("analyst",), token_id="jti-1")
HELD = Reservation(team="alpha", period="2026-11", micros=272)
DEADLINE = T + timedelta(days=30)  # later than any test's clock
COUNTED = RateCount(scope="team", key="alpha", kind="requests", window="2026-11-25T09:30", counted=1, observed=3,
                    limit=10)
OVER = RateCount(scope="application", key="alice", kind="tokens", window="2026-11-25T09:30", counted=40,
                 observed=1040, limit=1000)
MARKED = ContentMarking(label="SECRET//NOFORN", found="(S//NF) at message 1, character 0", enforced=True)
TOTALS = {"team": "alpha", "period": "2026-11", "spent_micros": 100, "reserved_micros": 272, "cap_micros": 5000}


def env(stage: str):  # type: ignore[no-untyped-def]
    return envelope(RID, stage, T, PV)


def samples() -> list[AnyEvent]:
    """Every event type once, with every optional field set."""

    return [
        RequestSubmitted(**env("submit"), entry="http", token="a.b.c", chat=CHAT, reply_to="_INBOX.x",
                         deadline_at=DEADLINE),
        RequestAuthorized(**env("authz"), caller=CALLER, model_id="enclave-tiny", chat=CHAT, reply_to="_INBOX.x",
                          deadline_at=DEADLINE, content_marking=MARKED),
        RequestDenied(**env("authz"), reason="model_forbidden", rule="team-model-access", detail="no",
                      caller=CALLER, model="analyst-large", reply_to="_INBOX.x", content_marking=MARKED),
        RequestFailed(**env("failed-at-router"), stage="router", reason="request_failed", detail="gave up",
                      reply_to="_INBOX.x", reservation=HELD),
        MessageRejected(**env("reject"), subject="gw.submit", stream_seq=7, stage="edge", reason="invalid_request",
                        detail="Object missing required field `model`"),
        ResponseDelivered(**env("deliver"), outcome="completed", code=None, team="alpha"),
        ResponseUndelivered(**env("undelivered"), outcome="error", code="invocation_failed", team="alpha",
                            reason="caller_gone"),
        BudgetReserved(**env("reserve"), **TOTALS, caller=CALLER, model_id="enclave-tiny", amount_micros=272,
                       max_tokens=8, chat=CHAT, reply_to="_INBOX.x", deadline_at=DEADLINE, rates=(COUNTED,)),
        BudgetSettled(**env("settle"), **TOTALS, model_id="enclave-tiny", reserved_amount_micros=272,
                      charged_micros=100, prompt_tokens=20, completion_tokens=8),
        BudgetReleased(**env("release"), **TOTALS, amount_micros=272, reason="InvocationFailed"),
        BudgetThresholdCrossed(**envelope("alpha/2026-11/50", "threshold", T, PV), **TOTALS, threshold_pct=50),
        BudgetRejected(**env("reserve"), caller=CALLER, model_id="enclave-tiny", period="2026-11",
                       requested_micros=272, remaining_micros=10, cap_micros=5000, reason="rate_limited",
                       reply_to="_INBOX.x", rates=(COUNTED, OVER), retry_after_s=27),
        RouteSelected(**env("route-2"), caller=CALLER, requested_model="tiny", model_id="enclave-tiny",
                      endpoint="local-llama", substituted_from="tiny", max_tokens=8, chat=CHAT, reservation=HELD,
                      reply_to="_INBOX.x", attempt=2, tried=("gpu-node-1",), circuit_open=("gpu-node-3",),
                      deadline_at=DEADLINE, not_before=T + timedelta(milliseconds=120), strategy="latency",
                      candidates=("gpu-node-3", "local-llama"),
                      skipped=(Skipped("gpu-node-1", "failed_before"), Skipped("gpu-node-3", "circuit_open")),
                      observed_ms=(("gpu-node-3", 3.25), ("local-llama", 4.5)), substitution="alias of enclave-tiny"),
        RouteUnavailable(**env("route"), caller=CALLER, requested_model="x", reason="route_unavailable",
                         detail="none", reservation=HELD, reply_to="_INBOX.x", circuit_open=("gpu-node-3",)),
        InvocationCompleted(**env("invoke-2"), caller=CALLER, model_id="enclave-tiny", endpoint="local-llama",
                            prompt_tokens=20, completion_tokens=8, finish_reason="length", content="o o o",
                            latency_ms=2.5, reservation=HELD, reply_to="_INBOX.x", streamed=True,
                            usage_reported=False, first_token_ms=0.75, attempt=2),
        InvocationFailed(**env("invoke-2"), caller=CALLER, model_id="enclave-tiny", endpoint="local-llama",
                         error="timeout", detail="60s", latency_ms=60000.0, reservation=HELD, reply_to="_INBOX.x",
                         final=False, attempt=2, tried=("gpu-node-1",), requested_model="tiny",
                         substituted_from="tiny", max_tokens=8, chat=CHAT, deadline_at=DEADLINE),
        PolicyActivated(**envelope("policy-" + PV, "activate", T, PV), version=PV, sha256="ab" * 32,
                        git_commit="0" * 40, activated_by="ops", files={"catalog.toml": "[[model]]\n"}),
        BudgetClockTicked(**envelope("budget-tick-alpha-20261125T093000000000", "tick", T, PV), team="alpha"),
        EndpointObserved(**envelope("endpoint-gpu-node-3", "observed-0123456789ab-20261125T093000000000", T, PV),
                         endpoint="gpu-node-3", served=False, replica="0123456789abcdef0123456789abcdef"),
        ConsoleViewed(**envelope("view-1", "console", T, PV), viewer="alice", team="alpha", roles=("assessor",),
                      page="request", target="0123456789abcdef", status=200),
        AuditCheckpoint(**envelope("audit-1000", "checkpoint", T, "n/a"), seq=1000, head="cd" * 32,
                        previous_seq=0, previous_head="0" * 64, count=1000, signer="ed25519:0011223344556677",
                        signature="c2lnbmF0dXJl"),
    ]


SAMPLES_BY_NAME: dict[str, AnyEvent] = {type(e).__name__: e for e in samples()}


def upcast_samples() -> dict[tuple[str, int], AnyEvent]:
    """What each older stored version's golden file must read as today, by (type, version)."""
    return {
        ("RequestSubmitted", 1): RequestSubmitted(**env("submit"), entry="http", token="a.b.c", chat=CHAT,
                                                  reply_to="_INBOX.x"),
        ("RequestAuthorized", 1): RequestAuthorized(**env("authz"), caller=CALLER, model_id="enclave-tiny", chat=CHAT,
                                                    reply_to="_INBOX.x"),
        ("RequestAuthorized", 2): RequestAuthorized(**env("authz"), caller=CALLER, model_id="enclave-tiny", chat=CHAT,
                                                    reply_to="_INBOX.x", deadline_at=DEADLINE),
        ("BudgetReserved", 2): BudgetReserved(**env("reserve"), **TOTALS, caller=CALLER, model_id="enclave-tiny",
                                              amount_micros=272, max_tokens=8, chat=CHAT, reply_to="_INBOX.x",
                                              deadline_at=DEADLINE),
        ("BudgetRejected", 1): BudgetRejected(**env("reserve"), caller=CALLER, model_id="enclave-tiny",
                                              period="2026-11", requested_micros=272, remaining_micros=10,
                                              cap_micros=5000, reason="budget_exceeded", reply_to="_INBOX.x"),
        ("RequestDenied", 1): RequestDenied(**env("authz"), reason="model_forbidden", rule="team-model-access",
                                            detail="no", caller=CALLER, model="analyst-large", reply_to="_INBOX.x"),
        ("BudgetReserved", 1): BudgetReserved(**env("reserve"), **TOTALS, caller=CALLER, model_id="enclave-tiny",
                                              amount_micros=272, max_tokens=8, chat=CHAT, reply_to="_INBOX.x"),
        ("RouteSelected", 1): RouteSelected(**env("route"), caller=CALLER, requested_model="tiny",
                                            model_id="enclave-tiny", endpoint="local-llama", substituted_from="tiny",
                                            max_tokens=8, chat=CHAT, reservation=HELD, reply_to="_INBOX.x"),
        ("RouteSelected", 2): RouteSelected(**env("route-2"), caller=CALLER, requested_model="tiny",
                                            model_id="enclave-tiny", endpoint="local-llama", substituted_from="tiny",
                                            max_tokens=8, chat=CHAT, reservation=HELD, reply_to="_INBOX.x", attempt=2,
                                            tried=("gpu-node-1",), circuit_open=("gpu-node-3",), deadline_at=DEADLINE,
                                            not_before=T + timedelta(milliseconds=120)),
        ("RouteUnavailable", 1): RouteUnavailable(**env("route"), caller=CALLER, requested_model="x",
                                                  reason="route_unavailable", detail="none", reservation=HELD,
                                                  reply_to="_INBOX.x"),
        ("InvocationCompleted", 1): InvocationCompleted(**env("invoke"), caller=CALLER, model_id="enclave-tiny",
                                                        endpoint="local-llama", prompt_tokens=20, completion_tokens=8,
                                                        finish_reason="length", content="o o o", latency_ms=2.5,
                                                        reservation=HELD, reply_to="_INBOX.x"),
        ("InvocationFailed", 1): InvocationFailed(**env("invoke"), caller=CALLER, model_id="enclave-tiny",
                                                  endpoint="local-llama", error="timeout", detail="60s",
                                                  latency_ms=60000.0, reservation=HELD, reply_to="_INBOX.x",
                                                  final=True, requested_model="enclave-tiny"),
    }
