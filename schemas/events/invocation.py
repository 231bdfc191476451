"""Facts about calling a model server.

Stored versions: InvocationFailed v1 ended its request (the budget released, the caller got the
error) and is frozen as `InvocationFailedV1`; v2 is one failed attempt, after which the router
decides the next endpoint or that none is left (issue 10).
"""

from datetime import datetime

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class InvocationCompletedV1(Event, frozen=True, kw_only=True, tag="InvocationCompleted", forbid_unknown_fields=True):
    """Version 1 as stored before streaming: read, upcast, never written."""

    caller: Caller
    model_id: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    content: str
    latency_ms: float
    reservation: Reservation
    reply_to: str


class InvocationCompleted(Event, frozen=True, kw_only=True, tag="InvocationCompleted"):
    """The model server answered.

    `usage_reported` true: the usage is what the server reported (a completion count below the
    content chunks received is raised to it). False (a streamed answer from a server that reports
    none): the gateway counted it as upper bounds: completion tokens are `max_tokens` when the
    answer stopped at the limit, else its bytes (at least its chunks, at most `max_tokens`); prompt
    tokens are the bytes of the messages plus the default template overheads. The charge never
    passes the reservation.
    """

    schema_version: int = 2
    caller: Caller
    model_id: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    content: str
    latency_ms: float
    reservation: Reservation
    reply_to: str
    streamed: bool = False
    usage_reported: bool = True  # every v1 completion's usage was the server's
    first_token_ms: float | None = None  # a streamed answer: when its first token arrived
    attempt: int = 1
    # a streamed answer that broke off after tokens reached the caller (finish_reason "interrupted"):
    # why; `content` and the usage are what the caller got
    broken_off: str | None = None


class InvocationFailedV1(Event, frozen=True, kw_only=True, tag="InvocationFailed", forbid_unknown_fields=True):
    """Version 1 as stored before fallbacks: read, upcast, never written."""

    caller: Caller
    model_id: str
    endpoint: str
    error: str
    detail: str
    latency_ms: float
    reservation: Reservation
    reply_to: str


class InvocationFailed(Event, frozen=True, kw_only=True, tag="InvocationFailed"):
    """One attempt failed or timed out at `endpoint`.

    `final` false (what invokers write): the router decides what follows, another endpoint or
    `RouteUnavailable`, from this event alone (it carries the route's request). `final` true: the
    request ends here (every v1 failure), so the budget releases and the caller gets the error.
    """

    schema_version: int = 2
    caller: Caller
    model_id: str
    endpoint: str
    error: str
    detail: str
    latency_ms: float
    reservation: Reservation
    reply_to: str
    final: bool
    attempt: int = 1
    tried: tuple[str, ...] = ()  # endpoints that failed before this attempt
    requested_model: str = ""
    substituted_from: str | None = None
    max_tokens: int = 0
    chat: ChatBody | None = None
    deadline_at: datetime | None = None  # when the caller stops waiting: no attempt starts after it
