"""Bytes in, events out, and back (JSON on the wire): no I/O here.

Decoding reads `type` and `schema_version` first, then decodes with the class registered for
that version and upcasts to the current one, so old events stay readable forever.
"""

from typing import Any

import msgspec

from .commands import SubmitReply, SubmitRequest
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
_submit = msgspec.json.Decoder(SubmitRequest)
_reply = msgspec.json.Decoder(SubmitReply)


def encode(obj: msgspec.Struct) -> bytes:
    """JSON bytes for an event, command or reply."""
    return _encoder.encode(obj)


def _decoder(cls: type[Any]) -> msgspec.json.Decoder[Any]:
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls)
    return dec


def decode_event(data: bytes) -> AnyEvent:
    """Decode any event of any released version into its current type."""
    try:
        head = _header.decode(data)
        reader = READERS.get((head.type, head.schema_version))
        if reader is None:
            raise DecodeError(f"unknown event type {head.type!r} v{head.schema_version}")
        cls, step = reader
        event: Event = _decoder(cls).decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise DecodeError(str(exc)) from exc
    result: Any = upcast(event, step)
    return result  # type: ignore[no-any-return]


def decode_as(data: bytes, cls: type[Any]) -> Any:
    """Decode into one expected event class (a wrong type is a DecodeError)."""
    event = decode_event(data)
    if not isinstance(event, cls):
        raise DecodeError(f"expected {cls.__name__}, got {type(event).__name__}")
    return event


def decode_submit(data: bytes) -> SubmitRequest:
    """Decode a `gw.submit` command."""
    try:
        return _submit.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)) from exc


def decode_reply(data: bytes) -> SubmitReply:
    """Decode the reply a caller receives."""
    try:
        return _reply.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)) from exc
