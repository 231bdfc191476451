"""What a model server's answer amounted to, and reading OpenAI's event stream: shared by the
invoker's decider and its adapters for the hosted APIs (pure: tests feed it bytes)."""

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from ...schemas.reasons import INTERRUPTED

_encoder = msgspec.json.Encoder()


def encoded_size(text: str) -> int:
    """Bytes the text takes inside an event's JSON (escapes included: a control byte takes six)."""
    return len(_encoder.encode(text)) - 2


Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # a negative count from a server would credit the team's ledger
# A larger answer, as JSON, is refused (bad_response) or cut (a stream): the fact that records it
# must fit a NATS message (1 MiB), with its envelope.
MAX_ANSWER_BYTES = 512 * 1024


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


class Usage0(Struct, frozen=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class CallStreamed(Struct, frozen=True, kw_only=True):
    """A streamed answer: the content chunks joined, and the usage if reported. `broken_off` says
    why it ended early, after tokens had reached the caller (they are its answer, and charged)."""

    content: str
    finish_reason: str
    chunks: int  # content chunks received: one per token on llama.cpp, vLLM and TGI
    usage: Usage0 | None
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
    usage: Usage0 | None = None
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
        self.usage: Usage0 | None = None
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
        return self.take(choice.delta.content, elapsed_ms)

    def take(self, text: str, elapsed_ms: float) -> str:
        """One piece of content received: kept, bounded, and handed back to pass on."""
        self.size += encoded_size(text)
        if self.size > MAX_ANSWER_BYTES:
            raise StreamBroken(f"the answer grew past {MAX_ANSWER_BYTES} bytes")
        if self.first_token_ms is None:
            self.first_token_ms = round(elapsed_ms, 3)
        self.parts.append(text)
        return text

    def reported(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage the server reported in its stream."""
        self.usage = Usage0(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

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

