"""Invoker decider: turn a model server's answer into a fact (DESIGN §5).

The HTTP call is the shell's; what to send and how to read the answer are pure functions here,
so replay can re-derive `InvocationCompleted` from a recorded response.
"""

from datetime import datetime
from typing import Any

import msgspec
from msgspec import Struct

from ...schemas.commands import ChatMessage
from ...schemas.events import AnyEvent, Event, InvocationCompleted, InvocationFailed, RouteSelected, envelope
from ...schemas.reasons import CONTEXT_EXCEEDED
from .. import catalog
from . import adapters
from .streams import (
    MAX_ANSWER_BYTES,
    CallAnswered,
    CallFailed,
    CallOutcome,
    CallStreamed,
    Count,
    StreamBroken,
    StreamReader,
    encoded_size,
)

STAGE = "invoke"


class InvokerState(Struct, frozen=True):
    """The invoker keeps no decision state."""


class _Message(Struct, frozen=True):
    content: str | None = None


class _Choice(Struct, frozen=True):
    message: _Message
    finish_reason: str | None = None



class _Usage(Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count


class OpenAIResponse(Struct, frozen=True):
    """The fields of an OpenAI chat.completion the gateway relies on."""

    choices: tuple[_Choice, ...]
    usage: _Usage


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


class StreamOptions(Struct, frozen=True):
    """Ask for the usage chunk; servers that do not know the option ignore it (llama-cpp-python)."""

    include_usage: bool = True


class UpstreamRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What goes to an OpenAI-compatible model server."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


def request_for(route: RouteSelected) -> tuple[str, bytes]:
    """The path and JSON body of the call in the endpoint's protocol (`max_tokens` is always the
    bound the budget reserved for, DESIGN §4)."""
    match route.protocol:
        case "anthropic":
            return adapters.anthropic_request(route)
        case "bedrock":
            return adapters.bedrock_request(route)
        case _:
            return "/v1/chat/completions", request_body(route)


def request_body(route: RouteSelected) -> bytes:
    """The OpenAI-compatible upstream JSON."""
    chat = route.chat
    return _encoder.encode(
        UpstreamRequest(
            model=route.model_id,
            messages=chat.messages,
            max_tokens=route.max_tokens,
            temperature=chat.temperature,
            seed=chat.seed,
            stream=chat.stream,
            stream_options=StreamOptions() if chat.stream else None,
        )
    )


def refusal(answer: CallAnswered) -> str:
    """The error code of a model server's non-200: `context_length_exceeded` when it says the
    prompt does not fit (llama.cpp, vLLM and OpenAI say so in their 400's body), else `http_<status>`."""
    body = answer.body[:2000].lower()
    if answer.status == 400 and b"context" in body and (b"exceed" in body or b"too long" in body):
        return CONTEXT_EXCEEDED
    return f"http_{answer.status}"


def whole_answer(protocol: str, body: bytes) -> adapters.Answer:
    """A whole (not streamed) answer in the endpoint's protocol; raises when it is not one."""
    match protocol:
        case "anthropic":
            return adapters.anthropic_answer(body)
        case "bedrock":
            return adapters.bedrock_answer(body)
    parsed = _response.decode(body)
    if not parsed.choices:
        raise ValueError("no choices")
    choice = parsed.choices[0]
    return adapters.Answer(content=choice.message.content or "", finish_reason=choice.finish_reason or "stop",
                           prompt_tokens=parsed.usage.prompt_tokens, completion_tokens=parsed.usage.completion_tokens)


def decide(route: RouteSelected, outcome: CallOutcome, policy_version: str, now: datetime) -> list[AnyEvent]:
    """InvocationCompleted for a well-formed 200, InvocationFailed for anything else."""
    if isinstance(outcome, CallFailed):
        return [_failed(route, policy_version, now, outcome.error, outcome.detail, outcome.latency_ms)]
    if isinstance(outcome, CallStreamed):
        return [_streamed(route, outcome, policy_version, now)]
    if outcome.status != 200:
        detail = outcome.body[:500].decode(errors="replace")
        return [_failed(route, policy_version, now, refusal(outcome), detail, outcome.latency_ms)]
    try:
        answer = whole_answer(route.protocol, outcome.body)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        return [_failed(route, policy_version, now, "bad_response", str(exc)[:500], outcome.latency_ms)]
    if encoded_size(answer.content) > MAX_ANSWER_BYTES:
        return [_failed(route, policy_version, now, "bad_response", f"an answer over {MAX_ANSWER_BYTES} bytes",
                        outcome.latency_ms)]
    return [
        InvocationCompleted(
            **envelope(route.request_id, stage(route.attempt), now, policy_version),
            caller=route.caller,
            model_id=route.model_id,
            endpoint=route.endpoint,
            reservation=route.reservation,
            reply_to=route.reply_to,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            finish_reason=answer.finish_reason,
            content=answer.content,
            latency_ms=outcome.latency_ms,
            attempt=route.attempt,
        )
    ]


def counted_completion_tokens(route: RouteSelected, outcome: CallStreamed) -> int:
    """An upper bound on the tokens of an answer whose server reported none: all it was allowed
    when it stopped at the limit, else no more than its bytes (a token is at least one byte) and
    never fewer than the chunks it came in."""
    if outcome.finish_reason == "length":
        return route.max_tokens
    return max(outcome.chunks, min(route.max_tokens, len(outcome.content.encode())))


def _streamed(route: RouteSelected, outcome: CallStreamed, policy_version: str, now: datetime) -> InvocationCompleted:
    """A streamed answer's fact; usage the server did not report is counted (see InvocationCompleted)."""
    usage = outcome.usage
    reported = usage is not None and (usage.prompt_tokens or usage.completion_tokens) > 0
    return InvocationCompleted(
        **_about(route, policy_version, now),
        # a server reporting fewer tokens than the chunks it sent is not believed
        prompt_tokens=usage.prompt_tokens if usage and usage.prompt_tokens else catalog.prompt_tokens_bound(route.chat),
        completion_tokens=max(usage.completion_tokens, outcome.chunks) if usage and reported
        else counted_completion_tokens(route, outcome),
        finish_reason=outcome.finish_reason,
        broken_off=outcome.broken_off,
        content=outcome.content,
        latency_ms=outcome.latency_ms,
        streamed=True,
        usage_reported=reported,
        first_token_ms=outcome.first_token_ms,
        attempt=route.attempt,
    )


def _about(route: RouteSelected, policy_version: str, now: datetime) -> dict[str, Any]:
    """What every outcome of an attempt says of it: its envelope and the route's request."""
    return {**envelope(route.request_id, stage(route.attempt), now, policy_version), "caller": route.caller,
            "model_id": route.model_id, "endpoint": route.endpoint, "reservation": route.reservation,
            "reply_to": route.reply_to}


def _failed(
    route: RouteSelected, policy_version: str, now: datetime, error: str, detail: str, latency_ms: float
) -> InvocationFailed:
    return InvocationFailed(
        **_about(route, policy_version, now),
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


__all__ = ["MAX_ANSWER_BYTES", "CallAnswered", "CallFailed", "CallOutcome", "CallStreamed", "StreamBroken",
           "StreamReader", "call_timeout", "counted_completion_tokens", "decide", "encoded_size", "evolve",
           "initial_state", "request_body", "request_for", "stage", "whole_answer"]
