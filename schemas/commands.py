"""Commands: what callers send at the edges (imperative names), and what they get back.

`SubmitRequest` is the body of a NATS request on `gw.submit`; the HTTP edge builds the same
command from an OpenAI chat-completions request, so both entries share one contract.
"""

from msgspec import Struct


class ChatMessage(Struct, frozen=True, kw_only=True, gc=False):
    """One OpenAI-style chat message."""

    role: str
    content: str


class ChatBody(Struct, frozen=True, kw_only=True, gc=False):
    """The part of an OpenAI chat-completions request the gateway forwards."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    # Stream the answer's tokens to the caller as the model produces them (`StreamChunk`s on the
    # chunk subject of its reply inbox, `subjects.chunks_of`), then the reply as usual. Added in
    # issue 10 with defaults that mean what an older event meant, so stored events read unchanged.
    stream: bool = False
    include_usage: bool = False  # OpenAI's stream_options.include_usage: a usage chunk last
    # How to pick among the model's endpoints, when the catalog lets a request ask (issue 10):
    # "ordered", "weighted", "cheapest" or "latency"; None: the model's own strategy.
    strategy: str | None = None


class SubmitRequest(Struct, frozen=True, kw_only=True, gc=False):
    """A request on `gw.submit`: a session token plus the chat body."""

    token: str
    chat: ChatBody
    input_label: str | None = None  # e.g. "SECRET//SI//NOFORN"; see docs/architecture.md for defaults
    output_label: str | None = None
    # how long the caller will wait, in seconds; the edge's request timeout when absent or longer
    timeout_s: float | None = None


class StreamChunk(Struct, frozen=True, kw_only=True, gc=False):
    """Some of an answer's tokens, as the model server produced them (core NATS, never stored).

    `index` counts from 0 within an attempt. The reply that follows (`SubmitReply`) is the
    authority: its content is what the chunks add up to, and its usage is what was charged.
    """

    request_id: str
    model: str  # the model serving it (a substitute's id when the requested name was swapped)
    attempt: int
    index: int
    content: str


class Usage(Struct, frozen=True, kw_only=True, gc=False):
    """Token counts the model server reported."""

    prompt_tokens: int
    completion_tokens: int


class Completion(Struct, frozen=True, kw_only=True, gc=False):
    """A successful answer."""

    model: str
    content: str
    finish_reason: str
    usage: Usage
    # The worst case held for this call; the exact charge settles after the reply (BudgetSettled).
    reserved_micros: int


class ErrorBody(Struct, frozen=True, kw_only=True, gc=False):
    """A refusal or failure, with our reason code (schemas.reasons)."""

    code: str
    message: str
    rule: str | None = None
    remaining_micros: int | None = None
    requested_micros: int | None = None
    retry_after_s: int | None = None  # rate_limited: when the limit's minute ends (HTTP Retry-After)


class SubmitReply(Struct, frozen=True, kw_only=True, gc=False):
    """The reply on the caller's inbox: exactly one of `completion` and `error` is set."""

    request_id: str
    completion: Completion | None = None
    error: ErrorBody | None = None
