"""Invoker decider: turn a model server's answer into a fact (DESIGN §5).

The HTTP call is the shell's; what to send and how to read the answer are pure functions here,
so replay can re-derive `InvocationCompleted` from a recorded response.
"""

from datetime import datetime

import msgspec
from msgspec import Struct

from ...schemas.commands import ChatMessage
from ...schemas.events import AnyEvent, Event, InvocationCompleted, InvocationFailed, RouteSelected, envelope

STAGE = "invoke"


class InvokerState(Struct, frozen=True):
    """The invoker keeps no decision state."""


class _Message(Struct, frozen=True):
    content: str | None = None


class _Choice(Struct, frozen=True):
    message: _Message
    finish_reason: str | None = None


class _Usage(Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class OpenAIResponse(Struct, frozen=True):
    """The fields of an OpenAI chat.completion the gateway relies on."""

    choices: tuple[_Choice, ...]
    usage: _Usage


class CallAnswered(Struct, frozen=True, kw_only=True):
    """The server answered with an HTTP status and a body."""

    status: int
    body: bytes
    latency_ms: float


class CallFailed(Struct, frozen=True, kw_only=True):
    """The call never got an answer (refused, reset, timed out)."""

    error: str
    detail: str
    latency_ms: float


CallOutcome = CallAnswered | CallFailed

_response = msgspec.json.Decoder(OpenAIResponse)
_encoder = msgspec.json.Encoder()


def call_timeout(route: RouteSelected, now: datetime, longest_s: float) -> float:
    """How long the call may take: the invoker's limit, or what is left before the deadline (<= 0: none)."""
    if route.deadline_at is None:
        return longest_s
    return min(longest_s, (route.deadline_at - now).total_seconds())


def stage(attempt: int) -> str:
    """The event-id stage of an attempt's outcome: each attempt's is its own fact, never a duplicate."""
    return STAGE if attempt == 1 else f"{STAGE}-{attempt}"


def initial_state() -> InvokerState:
    """The empty state."""
    return InvokerState()


def evolve(state: InvokerState, event: Event) -> InvokerState:
    """No event changes the invoker's state."""
    return state


class UpstreamRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What goes to an OpenAI-compatible model server."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None = None
    seed: int | None = None


def request_body(route: RouteSelected) -> bytes:
    """The upstream JSON; `max_tokens` is always the bound the budget reserved for (DESIGN §4)."""
    chat = route.chat
    return _encoder.encode(
        UpstreamRequest(
            model=route.model_id,
            messages=chat.messages,
            max_tokens=route.max_tokens,
            temperature=chat.temperature,
            seed=chat.seed,
        )
    )


def decide(route: RouteSelected, outcome: CallOutcome, policy_version: str, now: datetime) -> list[AnyEvent]:
    """InvocationCompleted for a well-formed 200, InvocationFailed for anything else."""
    if isinstance(outcome, CallFailed):
        return [_failed(route, policy_version, now, outcome.error, outcome.detail, outcome.latency_ms)]
    if outcome.status != 200:
        detail = outcome.body[:500].decode(errors="replace")
        return [_failed(route, policy_version, now, f"http_{outcome.status}", detail, outcome.latency_ms)]
    try:
        parsed = _response.decode(outcome.body)
    except msgspec.DecodeError as exc:
        return [_failed(route, policy_version, now, "bad_response", str(exc), outcome.latency_ms)]
    if not parsed.choices:
        return [_failed(route, policy_version, now, "bad_response", "no choices", outcome.latency_ms)]
    choice = parsed.choices[0]
    return [
        InvocationCompleted(
            **envelope(route.request_id, stage(route.attempt), now, policy_version),
            caller=route.caller,
            model_id=route.model_id,
            endpoint=route.endpoint,
            reservation=route.reservation,
            reply_to=route.reply_to,
            prompt_tokens=parsed.usage.prompt_tokens,
            completion_tokens=parsed.usage.completion_tokens,
            finish_reason=choice.finish_reason or "stop",
            content=choice.message.content or "",
            latency_ms=outcome.latency_ms,
        )
    ]


def _failed(
    route: RouteSelected, policy_version: str, now: datetime, error: str, detail: str, latency_ms: float
) -> InvocationFailed:
    return InvocationFailed(
        **envelope(route.request_id, stage(route.attempt), now, policy_version),
        caller=route.caller,
        model_id=route.model_id,
        endpoint=route.endpoint,
        reservation=route.reservation,
        reply_to=route.reply_to,
        error=error,
        detail=detail,
        latency_ms=latency_ms,
        final=False,  # the router decides what follows: the next endpoint, or the end of the request
        attempt=route.attempt,
        tried=route.tried,
        requested_model=route.requested_model,
        substituted_from=route.substituted_from,
        max_tokens=route.max_tokens,
        chat=route.chat,
        deadline_at=route.deadline_at,
    )
