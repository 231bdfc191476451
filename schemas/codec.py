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
    body on `gw.evt.request.failed` is refused, not obeyed (issue 8).
    """
    try:
        fast: Event | None = _current.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
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
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is a subclass; msgspec lets
        # a byte that is not UTF-8 inside a JSON string through as Python's own error
        raise DecodeError(str(exc)) from exc
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
    return _header.decode(data).schema_version


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
    except RecursionError:
        raise DecodeError("the JSON is nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)[:300]) from None


def decode_submit(data: bytes) -> SubmitRequest:
    """Decode a `gw.submit` command."""
    result: SubmitRequest = decode_json(_submit, data)
    return result


def decode_reply(data: bytes) -> SubmitReply:
    """Decode the reply a caller receives."""
    try:
        return _reply.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from exc


def decode_chunk(data: bytes) -> StreamChunk:
    """Decode a streamed chunk of an answer."""
    try:
        return _chunk.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from exc
