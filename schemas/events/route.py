"""Facts about routing a request to a model server (DESIGN §5).

Stored versions: RouteSelected v1 (one endpoint per model, one attempt) is frozen as
`RouteSelectedV1`; v2 adds the attempt and the endpoints that already failed (issue 10), frozen as
`RouteSelectedV2`; v3 adds how the endpoint was ranked (strategy, candidates, skips, figures).
"""

from datetime import datetime
from typing import Literal

from msgspec import Struct

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class RouteSelectedV1(Event, frozen=True, kw_only=True, tag="RouteSelected", forbid_unknown_fields=True):
    """Version 1 as stored before fallbacks: read, upcast, never written."""

    caller: Caller
    requested_model: str
    model_id: str
    endpoint: str
    substituted_from: str | None = None
    max_tokens: int
    chat: ChatBody
    reservation: Reservation
    reply_to: str


class RouteSelectedV2(Event, frozen=True, kw_only=True, tag="RouteSelected", forbid_unknown_fields=True):
    """Version 2 as stored before routing strategies were recorded: read, upcast, never written."""

    schema_version: int = 2
    caller: Caller
    requested_model: str
    model_id: str
    endpoint: str
    substituted_from: str | None = None
    max_tokens: int
    chat: ChatBody
    reservation: Reservation
    reply_to: str
    attempt: int = 1
    tried: tuple[str, ...] = ()
    circuit_open: tuple[str, ...] = ()
    deadline_at: datetime | None = None
    not_before: datetime | None = None


class Skipped(Struct, frozen=True, gc=False):
    """An endpoint ranked before the one chosen, and why it was not chosen."""

    endpoint: str
    reason: Literal["failed_before", "circuit_open", "no_invoker"]


class RouteSelected(Event, frozen=True, kw_only=True, tag="RouteSelected"):
    """The router chose a model and endpoint; `substituted_from` records an alias or swap, and
    `substitution` why.

    `attempt` counts from 1; `tried` names the endpoints that failed this request before, in order,
    so a fallback is decided from the event alone and every replica decides it the same way.
    `circuit_open` names the endpoints skipped as failing (issue 10 item 3). v3 records how it was
    ranked: the `strategy`, the `candidates` in the order it ranked them, each `skipped` one with
    its reason, and for "latency" the `observed_ms` figures it ranked by (replay ranks by them).
    """

    schema_version: int = 3
    caller: Caller
    requested_model: str
    model_id: str
    endpoint: str
    substituted_from: str | None = None
    max_tokens: int
    chat: ChatBody
    reservation: Reservation
    reply_to: str
    attempt: int = 1
    tried: tuple[str, ...] = ()
    # endpoints passed over because their circuit was open when this was decided: the breaker
    # figures the decision used, so replay re-makes it without the outcomes the replica had seen
    circuit_open: tuple[str, ...] = ()
    deadline_at: datetime | None = None  # when the caller stops waiting: no attempt starts after it
    not_before: datetime | None = None  # a retry's backoff: the invoker waits until then
    strategy: str = "ordered"  # every route before v3 was ranked in catalog order (or weighted)
    candidates: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    observed_ms: tuple[tuple[str, float], ...] = ()
    substitution: str | None = None  # e.g. "alias of enclave-tiny", "deprecated: enclave-tiny-v0 -> enclave-tiny"
    protocol: str = "openai"  # how the invoker calls the endpoint (the catalog's, for the model served)


class RouteUnavailableV1(Event, frozen=True, kw_only=True, tag="RouteUnavailable", forbid_unknown_fields=True):
    """Version 1 as stored before it named open circuits: read, upcast, never written."""

    caller: Caller
    requested_model: str
    reason: str
    detail: str
    reservation: Reservation
    reply_to: str


class RouteUnavailable(Event, frozen=True, kw_only=True, tag="RouteUnavailable"):
    """No eligible endpoint serves the model (or every one failed): the request ends here.

    v2: `circuit_open` names an endpoint whose retry its open circuit stopped, the breaker figure
    the decision used (as RouteSelected's), so replay re-makes it and checks the stream backs it.
    """

    schema_version: int = 2
    caller: Caller
    requested_model: str
    reason: str
    detail: str
    reservation: Reservation
    reply_to: str
    circuit_open: tuple[str, ...] = ()


class EndpointObserved(Event, frozen=True, kw_only=True, tag="EndpointObserved"):
    """A router replica's view of whether any invoker pulls an endpoint's routes changed.

    Published on each change (`request_id` is `endpoint-<name>`), so the `no_invoker` skips a route
    records are backed by a stored fact replay can check, not the router's word alone.
    """

    endpoint: str
    served: bool
    replica: str  # the router replica whose view it is
