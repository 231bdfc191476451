"""OpenAI's HTTP shapes for the edge: chat.completion, chunks and error bodies."""

import time

import msgspec
from msgspec import Struct

from ...schemas.commands import Completion, ErrorBody, StreamChunk, SubmitReply
from ...schemas.reasons import ERROR_TYPE, INTERRUPTED, http_status

_json = msgspec.json.Encoder()


class OpenAIError(Struct, frozen=True, kw_only=True):
    """OpenAI's error object, with our rule and budget figures beside its standard fields."""

    message: str
    type: str
    code: str
    param: str | None = None
    rule: str | None = None
    remaining_micros: int | None = None
    requested_micros: int | None = None
    retry_after_s: int | None = None  # rate_limited: as the Retry-After header says


class OpenAIErrorEnvelope(Struct, frozen=True):
    """`{"error": {...}}`."""

    error: OpenAIError


def openai_error(err: ErrorBody) -> tuple[int, OpenAIErrorEnvelope]:
    """HTTP status and body for a refusal."""
    status = http_status(err.code)
    return status, OpenAIErrorEnvelope(
        OpenAIError(
            message=err.message,
            type=ERROR_TYPE.get(status, "server_error"),
            code=err.code,
            rule=err.rule,
            remaining_micros=err.remaining_micros,
            requested_micros=err.requested_micros,
            retry_after_s=err.retry_after_s,
        )
    )


class _RespMessage(Struct, frozen=True):
    role: str
    content: str
    refusal: None = None  # required by OpenAI's schema (null: the model did not refuse)


class _RespChoice(Struct, frozen=True):
    index: int
    message: _RespMessage
    finish_reason: str
    logprobs: None = None  # required by OpenAI's schema; log probabilities are not offered


class _RespUsage(Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Struct, frozen=True):
    """OpenAI's `chat.completion` object."""

    id: str
    object: str
    created: int
    model: str
    choices: tuple[_RespChoice, ...]
    usage: _RespUsage


def openai_completion(request_id: str, c: Completion, created: int | None = None) -> ChatCompletion:
    """The chat.completion body for a successful reply."""
    u = c.usage
    return ChatCompletion(
        id=f"chatcmpl-{request_id}",
        object="chat.completion",
        created=created or int(time.time()),
        model=c.model,
        choices=(_RespChoice(0, _RespMessage("assistant", c.content), c.finish_reason),),
        usage=_RespUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens),
    )


class _Delta(Struct, frozen=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class _ChunkChoice(Struct, frozen=True):
    index: int
    delta: _Delta
    finish_reason: str | None
    logprobs: None = None  # as in a whole answer's choice


class ChatCompletionChunk(Struct, frozen=True, omit_defaults=True):
    """OpenAI's `chat.completion.chunk` object (`usage` only on the last one, when asked for)."""

    id: str
    object: str
    created: int
    model: str
    choices: tuple[_ChunkChoice, ...]
    usage: _RespUsage | None = None


class _StreamError(Struct, frozen=True):
    error: OpenAIError


class ChunkWriter:
    """One streamed answer's server-sent events: the role chunk first, each token's chunk, and from
    the reply what the tokens did not bring, the finish chunk, the usage chunk and `[DONE]`.

    The reply is the authority: the tokens an edge received are a prefix of its content (chunks
    travel on their own subject and may trail the reply), so only the rest of the content is sent.
    """

    def __init__(self, created: int, include_usage: bool) -> None:
        self.created, self.include_usage = created, include_usage
        self.request_id, self.model, self.attempt = "", "", 0
        self.sent: list[str] = []
        self.started = False

    def events(self, item: StreamChunk | SubmitReply) -> list[bytes]:
        """The `data:` events for a chunk (the first one also opens the answer) or for the reply."""
        out: list[bytes] = []
        if not self.started:
            self.started, self.request_id = True, item.request_id
            self.model = item.model if isinstance(item, StreamChunk) else self.model
            out.append(self._event(_Delta(role="assistant"), None))
        if isinstance(item, StreamChunk):
            # one attempt streams, its tokens once and in order (the router never starts another
            # after tokens went out, and the invoker never streams an attempt twice): anything else
            # is dropped, and the reply says what the answer was
            if (self.attempt and item.attempt != self.attempt) or item.index != len(self.sent):
                return out
            self.attempt = item.attempt
            self.sent.append(item.content)
            out.append(self._event(_Delta(content=item.content), None))
            return out
        if item.error is not None:  # after tokens went out, an error can only be told in the stream
            return [*out, self._error(item.error)]
        assert item.completion is not None
        c, self.model = item.completion, item.completion.model
        sent = "".join(self.sent)
        if not c.content.startswith(sent):  # cannot happen by the rules above; never finish as if it were fine
            return [*out, self._error(ErrorBody(code="invocation_failed", message=(
                "the streamed tokens differ from the recorded answer; read the answer again without streaming")))]
        if rest := c.content[len(sent):]:
            out.append(self._event(_Delta(content=rest), None))
        if c.finish_reason != INTERRUPTED:
            out.append(self._event(_Delta(), c.finish_reason))
        if self.include_usage:
            u = c.usage
            usage = _RespUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens)
            out.append(self._encode(self._chunk((), usage)))
        if c.finish_reason == INTERRUPTED:  # the tokens above are the answer, cut short and charged
            return [*out, self._error(ErrorBody(code="invocation_failed", message=(
                f"the model server's answer broke off after {c.usage.completion_tokens} tokens; "
                "what you received is recorded and charged")))]
        out.append(b"data: [DONE]\n\n")
        return out

    @staticmethod
    def _error(err: ErrorBody) -> bytes:
        _, body = openai_error(err)
        return b"data: " + _json.encode(_StreamError(body.error)) + b"\n\n"

    def _event(self, delta: _Delta, finish: str | None) -> bytes:
        return self._encode(self._chunk((_ChunkChoice(0, delta, finish),)))

    def _chunk(self, choices: tuple[_ChunkChoice, ...], usage: _RespUsage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=f"chatcmpl-{self.request_id}", object="chat.completion.chunk",
                                   created=self.created, model=self.model, choices=choices, usage=usage)

    @staticmethod
    def _encode(chunk: ChatCompletionChunk) -> bytes:
        return b"data: " + _json.encode(chunk) + b"\n\n"
