"""Subject names: `gw.evt.<aggregate>.<fact>[.<partition>]`.

Built only here so that a rename is one diff (STYLE §2). Partitions (team, model) are mapped to
safe subject tokens; events always carry the exact names.
"""

import hashlib
import re
from typing import assert_never

from .events import (
    AnyEvent,
    AuditCheckpoint,
    BudgetClockTicked,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    ConsoleViewed,
    EndpointObserved,
    InvocationCompleted,
    InvocationFailed,
    MessageRejected,
    PolicyActivated,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    ResponseDelivered,
    ResponseUndelivered,
    RouteSelected,
    RouteUnavailable,
)

STREAM = "GW_EVENTS"
ALL_EVENTS = "gw.evt.>"
EVENTS_HEAD = "gw.evt."  # every fact subject starts so
# Rate-limit counters (JetStream counters, ADR-49): derived data, never the audit trail; each
# request's counts are recorded in its BudgetReserved or BudgetRejected on GW_EVENTS.
RATES_STREAM = "GW_RATES"
ALL_RATES = "gw.rate.>"
SUBMIT = "gw.submit"  # prefix: each application submits on its own `gw.submit.<app>`
APP_INBOXES = "_INBOX_app"  # batch callers' inboxes, one prefix per application
EDGE_INBOXES = "_INBOX_edge"  # HTTP callers' inboxes, one prefix per edge replica
INBOX_HEAD, CHUNK_HEAD = "_INBOX_", "_CHUNK_"  # a reply inbox and where its streamed tokens go

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """A subject token for a team or model name: no dots, spaces or wildcards."""
    return _UNSAFE.sub("_", name) or "_"


def submit(app: str) -> str:
    """Where application `app` sends its requests; only that identity may publish here, so the
    subject itself names the sender and the edge can check the reply subject against it."""
    return f"{SUBMIT}.{app}"


def app_of_submit(subject: str) -> str | None:
    """The application a `gw.submit.<app>` subject names, or None for any other subject."""
    head, _, app = subject.partition(f"{SUBMIT}.")
    return app if not head and app and "." not in app else None


def app_inbox(app: str) -> str:
    """An application's inbox prefix: the only place it may read, and the only place it is answered."""
    return f"{APP_INBOXES}.{app}"


def edge_reply(replica: str, request_id: str) -> str:
    """Where one HTTP caller's reply goes: the inbox of the edge replica holding its connection."""
    return f"{EDGE_INBOXES}.{replica}.{request_id}"


def chunks_of(reply_to: str) -> str | None:
    """Where the streamed tokens of a request answered on `reply_to` go: the same subject under
    `_CHUNK_` instead of `_INBOX_`. A subject of its own, so the invokers that publish tokens can
    never publish a reply, and a caller reads them where it may read (`_CHUNK_app.<app>.>`)."""
    return CHUNK_HEAD + reply_to.removeprefix(INBOX_HEAD) if reply_to.startswith(INBOX_HEAD) else None


def request_submitted() -> str:
    """Where both entries publish a new request."""
    return "gw.evt.request.submitted"


def request_authorized(team: str) -> str:
    """Authz's allow, partitioned by team so budget work can be split by team."""
    return f"gw.evt.request.authorized.{token(team)}"


def request_denied(team: str | None) -> str:
    """Authz's refusal; the violations feed follows `gw.evt.request.denied.>`."""
    return f"gw.evt.request.denied.{token(team) if team else '_unknown'}"


def request_failed() -> str:
    """Terminal failure after `max_deliver`."""
    return "gw.evt.request.failed"


def message_rejected() -> str:
    """Undecodable or invalid bytes."""
    return "gw.evt.message.rejected"


def response_delivered() -> str:
    """The caller got its reply."""
    return "gw.evt.response.delivered"


def response_undelivered() -> str:
    """A reply that never reached its caller (gone, or a refused reply subject)."""
    return "gw.evt.response.undelivered"


def ledger(fact: str, team: str) -> str:
    """A team's money ledger: `reserved`, `settled`, `released`, `threshold` (compare-and-set guarded)."""
    return f"gw.evt.ledger.{fact}.{token(team)}"


def ledger_filter(team: str) -> str:
    """Every ledger fact of one team: the filter of the expected-last-sequence check."""
    return f"gw.evt.ledger.*.{token(team)}"


def rate_counter(window: str, scope: str, key: str, kind: str) -> str:
    """The counter of one rate limit in one UTC minute (`window` as `2026-11-29T13:27`). A key is
    made subject-safe and suffixed with a digest of itself, so two keys never share a counter."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    return f"gw.rate.{window.replace(':', '').replace('-', '')}.{scope}.{token(key)}-{digest}.{kind}"


def budget_rejected(team: str) -> str:
    """A refused reservation; outside the ledger so refusals never conflict with writes."""
    return f"gw.evt.budget.rejected.{token(team)}"


def budget_ticked(team: str) -> str:
    """The budget's clock, for a team with reservations past their deadline (an input, like any)."""
    return f"gw.evt.budget.ticked.{token(team)}"


def routes_of(model_id: str) -> str:
    """Every route selected for a model, whatever its endpoint (the newest tells which circuits were open)."""
    return f"gw.evt.route.selected.{token(model_id)}.*"


def route_selected(model_id: str, endpoint: str) -> str:
    """Partitioned by model and endpoint: each endpoint's invokers consume only its routes
    (`gw.evt.route.selected.*.<endpoint>`), so an invoker never takes a route it cannot serve."""
    return f"gw.evt.route.selected.{token(model_id)}.{token(endpoint)}"


def endpoint_observed(endpoint: str) -> str:
    """A router replica's changed view of whether an endpoint is served (under the routes it backs)."""
    return f"gw.evt.route.observed.{token(endpoint)}"


def routes_to(endpoint: str) -> str:
    """Every route to one endpoint, whatever the model: the filter of that endpoint's invokers."""
    return f"gw.evt.route.selected.*.{token(endpoint)}"


def legacy_places(event: AnyEvent) -> tuple[str, ...]:
    """Where stored events of the type were published before their subject changed: still theirs.

    Routes were once partitioned by model alone (`gw.evt.route.selected.<model>`)."""
    if isinstance(event, RouteSelected):
        return (f"gw.evt.route.selected.{token(event.model_id)}",)
    return ()


def route_unavailable(model: str) -> str:
    """No endpoint for the model."""
    return f"gw.evt.route.unavailable.{token(model)}"


def invocation_completed(model_id: str) -> str:
    """A model server answered."""
    return f"gw.evt.invocation.completed.{token(model_id)}"


def invocation_failed(model_id: str) -> str:
    """A model server failed."""
    return f"gw.evt.invocation.failed.{token(model_id)}"


def policy_activated() -> str:
    """The policy bundle in force; its newest message is the active policy."""
    return "gw.evt.policy.activated"


def console_viewed() -> str:
    """A page the web console was asked for."""
    return "gw.evt.console.viewed"


def audit_checkpoint() -> str:
    """The auditor's signed checkpoints: one chain, guarded by compare-and-set on this subject."""
    return "gw.evt.audit.checkpoint"


def msg_id(request_id: str, stage: str) -> str:
    """`Nats-Msg-Id` and event id: a republish after a crash is deduplicated by the server."""
    return f"{request_id}:{stage}"


# Each event type's subject as a pattern: the bus's published contract (docs/asyncapi.json); a
# test checks that `for_event` puts a sample of every type on a subject its pattern matches.
EVENT_SUBJECTS: dict[str, str] = {
    "RequestSubmitted": "gw.evt.request.submitted",
    "RequestAuthorized": "gw.evt.request.authorized.*",
    "RequestDenied": "gw.evt.request.denied.*",
    "RequestFailed": "gw.evt.request.failed",
    "MessageRejected": "gw.evt.message.rejected",
    "ResponseDelivered": "gw.evt.response.delivered",
    "ResponseUndelivered": "gw.evt.response.undelivered",
    "BudgetReserved": "gw.evt.ledger.reserved.*",
    "BudgetSettled": "gw.evt.ledger.settled.*",
    "BudgetReleased": "gw.evt.ledger.released.*",
    "BudgetThresholdCrossed": "gw.evt.ledger.threshold.*",
    "BudgetRejected": "gw.evt.budget.rejected.*",
    "BudgetClockTicked": "gw.evt.budget.ticked.*",
    "RouteSelected": "gw.evt.route.selected.*.*",
    "RouteUnavailable": "gw.evt.route.unavailable.*",
    "EndpointObserved": "gw.evt.route.observed.*",
    "InvocationCompleted": "gw.evt.invocation.completed.*",
    "InvocationFailed": "gw.evt.invocation.failed.*",
    "PolicyActivated": "gw.evt.policy.activated",
    "AuditCheckpoint": "gw.evt.audit.checkpoint",
    "ConsoleViewed": "gw.evt.console.viewed",
}


def for_event(event: AnyEvent) -> str:
    """The subject an event is published on, derived from the event alone."""

    match event:
        case RequestSubmitted():
            return request_submitted()
        case RequestAuthorized():
            return request_authorized(event.caller.team)
        case RequestDenied():
            return request_denied(event.caller.team if event.caller else None)
        case RequestFailed():
            return request_failed()
        case MessageRejected():
            return message_rejected()
        case ResponseDelivered():
            return response_delivered()
        case ResponseUndelivered():
            return response_undelivered()
        case BudgetReserved():
            return ledger("reserved", event.team)
        case BudgetSettled():
            return ledger("settled", event.team)
        case BudgetReleased():
            return ledger("released", event.team)
        case BudgetThresholdCrossed():
            return ledger("threshold", event.team)
        case BudgetRejected():
            return budget_rejected(event.caller.team)
        case RouteSelected():
            return route_selected(event.model_id, event.endpoint)
        case RouteUnavailable():
            return route_unavailable(event.requested_model)
        case InvocationCompleted():
            return invocation_completed(event.model_id)
        case InvocationFailed():
            return invocation_failed(event.model_id)
        case PolicyActivated():
            return policy_activated()
        case AuditCheckpoint():
            return audit_checkpoint()
        case BudgetClockTicked():
            return budget_ticked(event.team)
        case EndpointObserved():
            return endpoint_observed(event.endpoint)
        case ConsoleViewed():
            return console_viewed()
        case _:
            assert_never(event)
