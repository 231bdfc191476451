"""Structured logs (issue 11 item 10): one JSON object per line, carrying the request being handled,
so a log line can be joined to the audit trail by `request_id` without ever holding prompt text.

The request id travels in a context variable: the bus sets it for each message it hands a handler
(from the `Nats-Msg-Id` every event is published with, `<request_id>:<stage>`), the edge for each
caller; asyncio copies it into the tasks they start.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_of_msg_id(msg_id: str | None) -> str | None:
    """The request id inside an event's `Nats-Msg-Id` (`<request_id>:<stage>`), if it has one."""
    if not msg_id or ":" not in msg_id:
        return None
    return msg_id.split(":", 1)[0] or None


class JsonLines(logging.Formatter):
    """`{"ts", "level", "service", "logger", "msg", "request_id"?, "exc_type"?}` on one line.

    An exception is named by its type and where it was raised, never by its message or a
    traceback's locals: a model server's error text can quote the prompt.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            line["request_id"] = rid
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            tb, ours = record.exc_info[2], None
            while tb is not None:
                if "enclave_gateway" in tb.tb_frame.f_code.co_filename:
                    ours = tb  # the innermost frame of ours: where a library's error reached our code
                if tb.tb_next is None:
                    break
                tb = tb.tb_next
            if tb is not None:
                line["exc_at"] = _where(tb)
            if ours is not None and ours is not tb:
                line["exc_in"] = _where(ours)
            code = getattr(record.exc_info[1], "err_code", None)
            if isinstance(code, int):  # a JetStream API error: the server's own code and words, no content
                line["exc_code"] = code
                line["exc_desc"] = str(getattr(record.exc_info[1], "description", ""))[:200]
        return json.dumps(line, ensure_ascii=False)


def _where(tb: TracebackType) -> str:
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"


def configure(service: str, level: int = logging.INFO) -> None:
    """Send the process's logs to stderr as JSON lines (`gateway worker` runs with this)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a line like any other, not raw stderr
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def _uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """The exception that ends the process, as one more JSON line: a raw traceback would break the
    log's format and could quote a prompt in an exception's message."""
    logging.getLogger("enclave_gateway.uncaught").critical("the process ended on an uncaught exception",
                                                          exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        _uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's report of an error no one awaited, as one JSON line naming it by type: the
    loop's own handler prints the task and the exception's repr, which can quote a prompt."""
    exc = context.get("exception")
    logging.getLogger("enclave_gateway.loop").error(
        str(context.get("message") or "an error in the event loop"),
        exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)
