"""Requests that aiohttp's parser refuses before any route or middleware runs.

Bytes that are not HTTP, a request line or header over the parser's limit, too many headers: aiohttp
answered those itself, in text/plain, with no record in the stream, and logged a traceback quoting
the offending bytes, which may be a prompt or a token (issue 11 item 7). Here they are recorded as a
MessageRejected first (AU-5: no refusal is served unrecorded), answered in OpenAI's error shape, and
logged without a byte of what the caller sent.

aiohttp builds that answer in `RequestHandler.handle_error`, a method of a class it exports for this
kind of extension; `OpenAIShapedRunner` makes its server use a subclass. The record is awaited in the
answer's `prepare`, the first asynchronous step aiohttp takes with it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from ...schemas.commands import SubmitReply
from . import openai_shapes

log = logging.getLogger("enclave_gateway.edge")
_json = msgspec.json.Encoder()
SUBJECT = "http:unparsed"  # the MessageRejected's subject: no route was ever matched

Record = Callable[[str, str], Awaitable[SubmitReply]]  # (code, detail) -> the reply, once recorded


def detail(exc: BaseException | None) -> str:
    """What the caller is told: the kind of defect, never the bytes (aiohttp's messages quote them)."""
    if isinstance(exc, LineTooLong):
        return "a request line or header field is over the limit of the server's HTTP parser"
    if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        return "the number of header fields is over the limit of the server's HTTP parser"
    return f"the request is not valid HTTP/1.1 ({type(exc).__name__ if exc else 'unparsed'})"


def where(exc: BaseException | None) -> str:
    """The innermost frame of an exception, for a log line that names the fault and not the data."""
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "-"


class _RecordedRefusal(web.Response):
    """An OpenAI-shaped refusal whose MessageRejected is stored before a byte of it is sent."""

    def __init__(self, status: int, why: str, record: Record) -> None:
        super().__init__(status=status, content_type="application/json")
        self._why = why
        self._record = record
        self.force_close()  # what follows a message the parser refused cannot be trusted

    async def prepare(self, request: web.BaseRequest) -> Any:
        reply = await self._record("invalid_request", self._why)  # audit_unavailable if it was not stored
        assert reply.error is not None
        status, body = openai_shapes.openai_error(reply.error)
        self.set_status(status)
        self.body = _json.encode(body)
        self.headers["X-Request-Id"] = reply.request_id
        return await super().prepare(request)


def _internal_error() -> web.Response:
    body = {"error": {"message": "the gateway failed to handle the request", "code": "request_failed",
                      "type": "server_error", "param": None}}
    response = web.Response(status=500, body=_json.encode(body), content_type="application/json")
    response.force_close()
    return response


def handler_class(record: Record) -> type[web.RequestHandler]:
    """aiohttp's protocol handler, answering and logging its own refusals our way."""

    class OpenAIShapedErrors(web.RequestHandler):
        __slots__ = ()

        def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None) -> web.StreamResponse:
            if request.writer.output_size > 0:  # as aiohttp: part of an answer went out, nothing can follow
                raise ConnectionError("response already started; the connection is closed")
            log.warning("edge: HTTP %d for %s (%s at %s)", status, request.remote, type(exc).__name__, where(exc))
            if status >= 500:  # our handler failed or timed out: not the caller's bytes to record as refused
                return _internal_error()
            return _RecordedRefusal(status, detail(exc), record)

        def log_exception(self, *args: Any, **kw: Any) -> None:
            # aiohttp's own log lines carry the exception, whose message may quote what the caller sent
            exc = kw.get("exc_info")
            log.error("edge: %s (%s at %s)", args[0] if args else "HTTP error",
                      type(exc).__name__ if isinstance(exc, BaseException) else "-",
                      where(exc) if isinstance(exc, BaseException) else "-")

    return OpenAIShapedErrors


class _Server(web.Server):
    """aiohttp's server, making connections of `handler` (set per runner by `OpenAIShapedRunner`)."""

    handler: type[web.RequestHandler] = web.RequestHandler

    def __call__(self) -> web.RequestHandler:
        made = super().__call__()
        made.__class__ = self.handler  # same slots, one method more: aiohttp's construction, our errors
        return made


class OpenAIShapedRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parser refusals through `record` (see module doc)."""

    def __init__(self, app: web.Application, record: Record, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._handler = handler_class(record)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        server.handler = self._handler  # type: ignore[attr-defined]
        return server
