"""Bytes in, events out, and back (JSON on the wire): no I/O here.

Decoding reads `type` and `schema_version` first, then decodes with the class registered for
that version and upcasts to the current one, so old events stay readable forever.
"""

from typing import Any

import msgspec

from . import subjects
from .commands import StreamChunk, SubmitReply, SubmitRequest
from .events import AnyEvent, Event
from .upcast import READERS, upcast


class DecodeError(ValueError):
    """Bytes that are not a valid event or command; the message names the path (msgspec's text)."""


class UnsignedFact(DecodeError):
    """A fact that no owner of its subject signed (services/fact_signatures.py): refused like bad
    bytes wherever it would count, recorded, and counted."""


# A NATS message is at most 1 MiB (the server's max_payload): nothing larger is an event of ours.
MAX_MESSAGE_BYTES = 1024 * 1024
# What msgspec raises besides DecodeError for hostile bytes: a byte that is not UTF-8 inside a JSON
# string surfaces as Python's own error, and a document nested past the interpreter's recursion
# guard (1,000 levels, 2 KB of brackets) as RecursionError. Every one of them is a DecodeError here:
# an error that escaped this module stopped a worker for good once (its message stays in the stream).
_HOSTILE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError, TypeError, OverflowError)


def _checked_size(data: bytes) -> bytes:
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{len(data)} bytes: larger than any event ({MAX_MESSAGE_BYTES} bytes at most)")
    return data


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "the JSON is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid utf-8 (at byte {exc.start})"
    return str(exc)[:300]


class _Header(msgspec.Struct):
    type: str
    schema_version: int = 1


_encoder = msgspec.json.Encoder()
_header = msgspec.json.Decoder(_Header)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
# One pass over the bytes for an event of a current version (nearly all of them): a third of the
# cost of reading the header first. Anything else, or bytes this refuses, takes the header path,
# which upcasts old versions and words the precise error.
_current: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyEvent)
_submit = msgspec.json.Decoder(SubmitRequest)
_reply = msgspec.json.Decoder(SubmitReply)
_chunk = msgspec.json.Decoder(StreamChunk)


def encode(obj: msgspec.Struct) -> bytes:
    """JSON bytes for an event, command or reply."""
    return _encoder.encode(obj)


def _decoder(cls: type[Any]) -> msgspec.json.Decoder[Any]:
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls)
    return dec


def decode_event(data: bytes, subject: str | None = None) -> AnyEvent:
    """Decode any event of any released version into its current type.

    With `subject` (where the message was stored or delivered from), the event must be one that is
    published exactly there (`subjects.for_event`). The server lets each identity publish only its
    own subjects, so this binds an event's type to who may have written it: a `RequestAuthorized`
    body on `gw.evt.request.failed` is refused, not obeyed.
    """
    _checked_size(data)
    try:
        fast: Event | None = _current.decode(data)
    except _HOSTILE:
        fast = None
    if fast is not None and READERS.get((str(type(fast).__struct_config__.tag), fast.schema_version)) == (
            type(fast), None):
        return _placed(fast, subject)  # type: ignore[arg-type]  # every current event type is an AnyEvent
    try:
        head = _header.decode(data)
        reader = READERS.get((head.type, head.schema_version))
        if reader is None:
            raise DecodeError(f"unknown event type {head.type!r} v{head.schema_version}")
        cls, step = reader
        event: Event = _decoder(cls).decode(data)
    except DecodeError:
        raise
    except _HOSTILE as exc:  # ValidationError is a subclass of msgspec.DecodeError
        raise DecodeError(_why(exc)) from None
    result: AnyEvent = upcast(event, step)  # type: ignore[assignment]  # the reader registry pairs type and class
    return _placed(result, subject)


def decode_event_versioned(data: bytes, subject: str | None = None) -> tuple[AnyEvent, int]:
    """`decode_event`, and the version the bytes were written at (the current one's, read fast)."""
    event = decode_event(data, subject)
    return event, (event.schema_version if b'"schema_version":' + str(event.schema_version).encode() in data
                   else stored_version(data))


def as_version(event: AnyEvent, version: int) -> AnyEvent:
    """What `event` reads as once written at an older `version`: the fields that version lacks take
    what its upcaster gives them. Replay compares a decision stored at an old version this way,
    since re-deciding it today fills in what the old version never recorded."""
    tag = str(type(event).__struct_config__.tag)
    reader = READERS.get((tag, version))
    if reader is None or reader[1] is None:
        return event
    cls, step = reader
    known = {f.encode_name for f in msgspec.structs.fields(cls)} | {"type"}
    fields = {k: v for k, v in msgspec.json.decode(encode(event)).items() if k in known}
    result: AnyEvent = upcast(_decoder(cls).decode(encode_obj(fields)), step)  # type: ignore[assignment]
    return result


def encode_obj(obj: object) -> bytes:
    """JSON bytes of plain data."""
    return _encoder.encode(obj)


def stored_version(data: bytes) -> int:
    """The `schema_version` the bytes were written with (an upcast event reports its current one)."""
    try:
        return _header.decode(_checked_size(data)).schema_version
    except _HOSTILE as exc:
        raise DecodeError(_why(exc)) from None


def _placed(event: AnyEvent, subject: str | None) -> AnyEvent:
    if subject is not None and (expected := subjects.for_event(event)) != subject and \
            subject not in subjects.legacy_places(event):
        raise DecodeError(f"a {type(event).__struct_config__.tag} belongs on {expected!r}, not on {subject!r}")
    return event


def decode_as(data: bytes, cls: type[Any], subject: str | None = None) -> Any:
    """Decode into one expected event class (a wrong type, or the wrong subject, is a DecodeError)."""
    event = decode_event(data, subject)
    if not isinstance(event, cls):
        raise DecodeError(f"expected {cls.__name__}, got {type(event).__name__}")
    return event


def decode_json(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode a caller's JSON; every way it can be wrong is a DecodeError that names the problem
    and never quotes the caller's text (bytes that are not UTF-8, nesting too deep, bad types)."""
    try:
        return decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"the body is not valid utf-8 (at byte {exc.start})") from None
    except _HOSTILE as exc:
        raise DecodeError(_why(exc)) from None


def decode_submit(data: bytes) -> SubmitRequest:
    """Decode a `gw.submit` command."""
    result: SubmitRequest = decode_json(_submit, data)
    return result


def decode_reply(data: bytes) -> SubmitReply:
    """Decode the reply a caller receives."""
    return decode_json(_reply, _checked_size(data))  # type: ignore[no-any-return]


def decode_chunk(data: bytes) -> StreamChunk:
    """Decode a streamed chunk of an answer."""
    return decode_json(_chunk, _checked_size(data))  # type: ignore[no-any-return]
