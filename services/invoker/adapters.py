"""Adapters for the unclassified deployments' hosted APIs: Anthropic Messages and Bedrock Converse.

Pure translation (DESIGN §3): an OpenAI-shaped chat into each protocol's request, and each
protocol's answer (whole or streamed) back into what the invoker records. The HTTP calls, keys and
request signing are the shell's. In enclave mode both are refused, at start and at call time.
"""

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from ...schemas.commands import ChatBody
from ...schemas.events import RouteSelected
from .streams import StreamBroken, StreamReader

Protocol = Literal["openai", "anthropic", "bedrock"]
HOSTED: tuple[Protocol, ...] = ("anthropic", "bedrock")  # leave the enclave: refused in enclave mode
ANTHROPIC_VERSION = "2023-06-01"
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
_encoder = msgspec.json.Encoder()


class Answer(Struct, frozen=True, kw_only=True):
    """A whole answer in the gateway's terms, whatever protocol carried it."""

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def finish_reason(stop_reason: str | None) -> str:
    """Anthropic's and Bedrock's stop reasons as OpenAI finish reasons."""
    return {"max_tokens": "length", "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
            "guardrail_intervened": "content_filter", "content_filtered": "content_filter"}.get(stop_reason or "",
                                                                                              "stop")


def _split_system(chat: ChatBody) -> tuple[str, list[tuple[str, str]]]:
    """Both APIs take system text apart from the turns, and only `user`/`assistant` turns."""
    system = "\n\n".join(m.content for m in chat.messages if m.role == "system")
    turns = [(m.role if m.role == "assistant" else "user", m.content) for m in chat.messages if m.role != "system"]
    return system, turns


# --- Anthropic Messages ---------------------------------------------------------------------------

class _AnthropicMessage(Struct, frozen=True):
    role: str
    content: str


class AnthropicRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """POST /v1/messages."""

    model: str
    max_tokens: int
    messages: tuple[_AnthropicMessage, ...]
    system: str | None = None
    temperature: float | None = None
    stream: bool = False


def anthropic_request(route: RouteSelected) -> tuple[str, bytes]:
    """The path and body for a route (max_tokens is the bound the budget reserved for)."""
    system, turns = _split_system(route.chat)
    body = AnthropicRequest(model=route.model_id, max_tokens=route.max_tokens,
                            messages=tuple(_AnthropicMessage(r, c) for r, c in turns), system=system or None,
                            temperature=route.chat.temperature, stream=route.chat.stream)
    return "/v1/messages", _encoder.encode(body)


class _Block(Struct, frozen=True):
    type: str
    text: str = ""


class _AnthropicUsage(Struct, frozen=True):
    input_tokens: Count = 0
    output_tokens: Count = 0


class _AnthropicAnswer(Struct, frozen=True):
    content: tuple[_Block, ...]
    usage: _AnthropicUsage
    stop_reason: str | None = None


_anthropic_answer = msgspec.json.Decoder(_AnthropicAnswer)


def anthropic_answer(body: bytes) -> Answer:
    """A Messages response; raises msgspec.DecodeError (or UnicodeDecodeError) when it is not one."""
    parsed = _anthropic_answer.decode(body)
    return Answer(content="".join(b.text for b in parsed.content if b.type == "text"),
                  finish_reason=finish_reason(parsed.stop_reason), prompt_tokens=parsed.usage.input_tokens,
                  completion_tokens=parsed.usage.output_tokens)


class _Delta(Struct, frozen=True):
    type: str = ""
    text: str = ""
    stop_reason: str | None = None


class _Start(Struct, frozen=True):
    usage: _AnthropicUsage = _AnthropicUsage()


class _Event(Struct, frozen=True):
    type: str
    delta: _Delta = _Delta()
    message: _Start = _Start()
    usage: _AnthropicUsage | None = None
    error: dict[str, str] | None = None


_anthropic_event = msgspec.json.Decoder(_Event)


class AnthropicStreamReader(StreamReader):
    """Anthropic's event stream: message_start (input tokens), content_block_delta (text),
    message_delta (stop reason, output tokens), message_stop; `error` events fail the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_tokens = 0

    def feed(self, line: bytes, elapsed_ms: float) -> str | None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return None  # `event:` lines repeat the data's type; blank lines separate events
        try:
            event = _anthropic_event.decode(line[5:].strip())
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise StreamBroken(f"unreadable event: {exc}") from exc
        match event.type:
            case "error":
                raise StreamBroken(f"the server reported an error mid-stream: {event.error}")
            case "message_start":
                self.prompt_tokens = event.message.usage.input_tokens
            case "content_block_delta" if event.delta.text:
                return self.take(event.delta.text, elapsed_ms)
            case "message_delta":
                self.finish_reason = finish_reason(event.delta.stop_reason)
                if event.usage is not None:
                    self.reported(self.prompt_tokens, event.usage.output_tokens)
            case "message_stop":
                self.done = True
        return None


# --- Bedrock Converse -----------------------------------------------------------------------------

class _Text(Struct, frozen=True):
    text: str


class _ConverseMessage(Struct, frozen=True):
    role: str
    content: tuple[_Text, ...]


class _InferenceConfig(Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    max_tokens: int
    temperature: float | None = None


class ConverseRequest(Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """POST /model/{modelId}/converse (or converse-stream)."""

    messages: tuple[_ConverseMessage, ...]
    inference_config: _InferenceConfig
    system: tuple[_Text, ...] = ()


def bedrock_request(route: RouteSelected) -> tuple[str, bytes]:
    """The path and body for a route; streaming uses the converse-stream action."""
    system, turns = _split_system(route.chat)
    body = ConverseRequest(messages=tuple(_ConverseMessage(r, (_Text(c),)) for r, c in turns),
                           inference_config=_InferenceConfig(max_tokens=route.max_tokens,
                                                             temperature=route.chat.temperature),
                           system=(_Text(system),) if system else ())
    action = "converse-stream" if route.chat.stream else "converse"
    return f"/model/{route.model_id}/{action}", _encoder.encode(body)


class _ConverseUsage(Struct, frozen=True, rename="camel"):
    input_tokens: Count = 0
    output_tokens: Count = 0


class _Output(Struct, frozen=True):
    message: _ConverseMessage


class _ConverseAnswer(Struct, frozen=True, rename="camel"):
    output: _Output
    usage: _ConverseUsage
    stop_reason: str | None = None


_converse_answer = msgspec.json.Decoder(_ConverseAnswer)


def bedrock_answer(body: bytes) -> Answer:
    """A Converse response; raises msgspec.DecodeError (or UnicodeDecodeError) when it is not one."""
    parsed = _converse_answer.decode(body)
    return Answer(content="".join(t.text for t in parsed.output.message.content),
                  finish_reason=finish_reason(parsed.stop_reason), prompt_tokens=parsed.usage.input_tokens,
                  completion_tokens=parsed.usage.output_tokens)


class _ContentDelta(Struct, frozen=True):
    text: str = ""


class _StreamEvent(Struct, frozen=True, rename="camel"):
    delta: _ContentDelta = _ContentDelta()
    stop_reason: str | None = None
    usage: _ConverseUsage | None = None
    message: str = ""


_stream_event = msgspec.json.Decoder(_StreamEvent)


class BedrockStreamReader(StreamReader):
    """ConverseStream's events, one decoded AWS event-stream frame each (the shell splits frames):
    contentBlockDelta (text), messageStop (stop reason), metadata (usage); exceptions fail it."""

    def feed_event(self, event_type: str, message_type: str, payload: bytes, elapsed_ms: float) -> str | None:
        """One frame's `:event-type` (or exception type), `:message-type` and JSON payload."""
        try:
            event = _stream_event.decode(payload or b"{}")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise StreamBroken(f"unreadable event: {exc}") from exc
        if message_type != "event":
            raise StreamBroken(f"the server reported {event_type} mid-stream: {event.message}")
        match event_type:
            case "contentBlockDelta" if event.delta.text:
                return self.take(event.delta.text, elapsed_ms)
            case "messageStop":
                self.finish_reason = finish_reason(event.stop_reason)
            case "metadata" if event.usage is not None:
                self.reported(event.usage.input_tokens, event.usage.output_tokens)
                self.done = True
        return None


def reader_for(protocol: str) -> StreamReader:
    """The stream reader of a protocol (OpenAI's is the decider's own)."""
    return {"anthropic": AnthropicStreamReader, "bedrock": BedrockStreamReader}.get(protocol, StreamReader)()


__all__ = ["HOSTED", "Answer", "anthropic_answer", "anthropic_request", "bedrock_answer", "bedrock_request",
           "reader_for"]
