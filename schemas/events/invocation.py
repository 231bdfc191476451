"""Facts about calling a model server."""

from .base import Caller, Event, Reservation


class InvocationCompleted(Event, frozen=True, kw_only=True, tag="InvocationCompleted"):
    """The model server answered; usage is what it reported."""

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


class InvocationFailed(Event, frozen=True, kw_only=True, tag="InvocationFailed"):
    """The model server failed or timed out; the reservation must be released."""

    caller: Caller
    model_id: str
    endpoint: str
    error: str
    detail: str
    latency_ms: float
    reservation: Reservation
    reply_to: str
