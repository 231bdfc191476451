"""OpenAI's HTTP shapes for the edge: chat.completion, chunks and error bodies."""

import time

from msgspec import Struct

from ...schemas.commands import Completion, ErrorBody
from ...schemas.reasons import ERROR_TYPE, http_status


class OpenAIError(Struct, frozen=True, kw_only=True):
    """OpenAI's error object, with our rule and budget figures beside its standard fields."""

    message: str
    type: str
    code: str
    param: str | None = None
    rule: str | None = None
    remaining_micros: int | None = None
    requested_micros: int | None = None


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
        )
    )


class _RespMessage(Struct, frozen=True):
    role: str
    content: str


class _RespChoice(Struct, frozen=True):
    index: int
    message: _RespMessage
    finish_reason: str


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


class ChatCompletionChunk(Struct, frozen=True):
    """OpenAI's `chat.completion.chunk` object."""

    id: str
    object: str
    created: int
    model: str
    choices: tuple[_ChunkChoice, ...]


def openai_chunks(request_id: str, c: Completion, created: int) -> list[ChatCompletionChunk]:
    """Role, content and finish chunks of a completed answer."""

    def chunk(delta: _Delta, finish: str | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{request_id}",
            object="chat.completion.chunk",
            created=created,
            model=c.model,
            choices=(_ChunkChoice(0, delta, finish),),
        )

    return [
        chunk(_Delta(role="assistant"), None),
        chunk(_Delta(content=c.content), None),
        chunk(_Delta(), c.finish_reason),
    ]
