"""Facts about routing a request to a model server (DESIGN §5).

Stored versions: RouteSelected v1 (one endpoint per model, one attempt) is frozen as
`RouteSelectedV1`; v2 adds the attempt and the endpoints that already failed (issue 10).
"""

from datetime import datetime

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class RouteSelectedV1(Event, frozen=True, kw_only=True, tag="RouteSelected"):
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


class RouteSelected(Event, frozen=True, kw_only=True, tag="RouteSelected"):
    """The router chose a model and endpoint; `substituted_from` records an alias or swap.

    `attempt` counts from 1; `tried` names the endpoints that failed this request before, in order,
    so a fallback is decided from the event alone and every replica decides it the same way.
    `circuit_open` names the endpoints skipped as failing (issue 10 item 3).
    """

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
    # endpoints passed over because their circuit was open when this was decided: the breaker
    # figures the decision used, so replay re-makes it without the outcomes the replica had seen
    circuit_open: tuple[str, ...] = ()
    deadline_at: datetime | None = None  # when the caller stops waiting: no attempt starts after it
    not_before: datetime | None = None  # a retry's backoff: the invoker waits until then


class RouteUnavailable(Event, frozen=True, kw_only=True, tag="RouteUnavailable"):
    """No eligible endpoint serves the model (or every one failed): the request ends here."""

    caller: Caller
    requested_model: str
    reason: str
    detail: str
    reservation: Reservation
    reply_to: str
