"""Invoker decider: turn a model server's answer into a fact (DESIGN §5).

The HTTP call is the shell's; what to send and how to read the answer are pure functions here,
so replay can re-derive `InvocationCompleted` from a recorded response.
"""

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from ...schemas.commands import ChatMessage
from ...schemas.events import AnyEvent, Event, InvocationCompleted, InvocationFailed, RouteSelected, envelope
from ...schemas.reasons import INTERRUPTED
from .. import catalog

STAGE = "invoke"


class InvokerState(Struct, frozen=True):
    """The invoker keeps no decision state."""


class _Message(Struct, frozen=True):
    content: str | None = None


class _Choice(Struct, frozen=True):
    message: _Message
    finish_reason: str | None = None


def encoded_size(text: str) -> int:
    """Bytes the text takes inside an event's JSON (escapes included: a control byte takes six)."""
    return len(_encoder.encode(text)) - 2


Count = Annotated[int, Meta(ge=0)]  # a negative count from a server would credit the team's ledger
# A larger answer, as JSON, is refused (bad_response) or cut (a stream): the fact that records it
# must fit a NATS message (1 MiB), with its envelope.
MAX_ANSWER_BYTES = 512 * 1024


class _Usage(Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count


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
    """The call never got an answer (refused, reset, timed out) and no token reached the caller."""

    error: str
    detail: str
    latency_ms: float


class _Usage0(Struct, frozen=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class CallStreamed(Struct, frozen=True, kw_only=True):
    """A streamed answer: the content chunks joined, and the usage if reported. `broken_off` says
    why it ended early, after tokens had reached the caller (they are its answer, and charged)."""

    content: str
    finish_reason: str
    chunks: int  # content chunks received: one per token on llama.cpp, vLLM and TGI
    usage: _Usage0 | None
    first_token_ms: float | None
    latency_ms: float
    broken_off: str | None = None


CallOutcome = CallAnswered | CallFailed | CallStreamed


class _Delta(Struct, frozen=True):
    content: str | None = None


class _ChunkChoice(Struct, frozen=True):
    delta: _Delta = _Delta()
    finish_reason: str | None = None


class _StreamError(Struct, frozen=True):
    message: str = ""


class _Chunk(Struct, frozen=True):
    choices: tuple[_ChunkChoice, ...] = ()
    usage: _Usage0 | None = None
    error: _StreamError | str | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class StreamBroken(Exception):
    """The server's event stream said it failed, or could not be read."""


class StreamReader:
    """Reads an OpenAI chat-completion event stream line by line: pure, so tests feed it bytes.

    `feed` returns the content a line adds (to pass on at once), or None.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: _Usage0 | None = None
        self.first_token_ms: float | None = None
        self.done = False
        self.size = 0  # bytes of content so far

    @property
    def chunks(self) -> int:
        """Content chunks received so far."""
        return len(self.parts)

    def feed(self, line: bytes, elapsed_ms: float) -> str | None:
        """Take one line of the event stream; raises StreamBroken on an error event or bad JSON."""
        line = line.strip()
        if not line.startswith(b"data:"):
            return None  # blank separators, comments (": ping"), `event:` and `id:` lines
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            chunk = _chunk.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise StreamBroken(f"unreadable chunk: {exc}") from exc
        if chunk.error is not None:
            raise StreamBroken(f"the server reported an error mid-stream: {chunk.error}")
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        if not choice.delta.content:
            return None
        self.size += encoded_size(choice.delta.content)
        if self.size > MAX_ANSWER_BYTES:
            raise StreamBroken(f"the answer grew past {MAX_ANSWER_BYTES} bytes")
        if self.first_token_ms is None:
            self.first_token_ms = round(elapsed_ms, 3)
        self.parts.append(choice.delta.content)
        return choice.delta.content

    def outcome(self, latency_ms: float) -> CallStreamed:
        """What the stream amounted to once read to its end; raises StreamBroken when it never said
        why the answer ended (a server that cut it short, as llama-cpp-python's does to one stream
        when another request comes, unless started with `--interrupt_requests False`)."""
        if self.finish_reason is None:
            raise StreamBroken(f"the stream ended after {self.chunks} tokens without a finish reason")
        return CallStreamed(content="".join(self.parts), finish_reason=self.finish_reason,
                            chunks=self.chunks, usage=self.usage, first_token_ms=self.first_token_ms,
                            latency_ms=latency_ms)

    def broken(self, error: str, detail: str, latency_ms: float) -> CallOutcome:
        """The stream failed: before any token, a failed attempt (another endpoint may serve it);
        after some, those tokens are the caller's answer, cut short."""
        if not self.parts:
            return CallFailed(error=error, detail=detail, latency_ms=latency_ms)
        return CallStreamed(content="".join(self.parts), finish_reason=INTERRUPTED, chunks=self.chunks,
                            usage=self.usage, first_token_ms=self.first_token_ms, latency_ms=latency_ms,
                            broken_off=f"{error}: {detail}"[:500])

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
            stream=chat.stream,
            stream_options=StreamOptions() if chat.stream else None,
        )
    )


def decide(route: RouteSelected, outcome: CallOutcome, policy_version: str, now: datetime) -> list[AnyEvent]:
    """InvocationCompleted for a well-formed 200, InvocationFailed for anything else."""
    if isinstance(outcome, CallFailed):
        return [_failed(route, policy_version, now, outcome.error, outcome.detail, outcome.latency_ms)]
    if isinstance(outcome, CallStreamed):
        return [_streamed(route, outcome, policy_version, now)]
    if outcome.status != 200:
        detail = outcome.body[:500].decode(errors="replace")
        return [_failed(route, policy_version, now, f"http_{outcome.status}", detail, outcome.latency_ms)]
    try:
        parsed = _response.decode(outcome.body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return [_failed(route, policy_version, now, "bad_response", str(exc)[:500], outcome.latency_ms)]
    if not parsed.choices:
        return [_failed(route, policy_version, now, "bad_response", "no choices", outcome.latency_ms)]
    choice = parsed.choices[0]
    if encoded_size(choice.message.content or "") > MAX_ANSWER_BYTES:
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
            prompt_tokens=parsed.usage.prompt_tokens,
            completion_tokens=parsed.usage.completion_tokens,
            finish_reason=choice.finish_reason or "stop",
            content=choice.message.content or "",
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
        **envelope(route.request_id, stage(route.attempt), now, policy_version),
        caller=route.caller,
        model_id=route.model_id,
        endpoint=route.endpoint,
        reservation=route.reservation,
        reply_to=route.reply_to,
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
