"""Facts about a request's life at the edges and in authorization."""

from datetime import datetime
from typing import Literal

from msgspec import Struct

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class ContentMarking(Struct, frozen=True, kw_only=True, gc=False):
    """Classification markings authz found in the prompt's own text (issue 12 item 2)."""

    label: str  # their high-water mark
    found: str  # each marking, rebuilt from what was recognised, and where it starts; never the text around it
    enforced: bool  # the input label was raised to `label` (mode enforce), or they were only recorded (report)


class RequestSubmittedV1(Event, frozen=True, kw_only=True, tag="RequestSubmitted", forbid_unknown_fields=True):
    """Version 1, stored before requests carried a deadline: read, upcast, never written."""

    entry: Literal["http", "nats"]
    token: str
    chat: ChatBody
    reply_to: str
    input_label: str | None = None  # as declared by the caller; None = not declared
    output_label: str | None = None


class RequestSubmitted(Event, frozen=True, kw_only=True, tag="RequestSubmitted"):
    """A caller's request entered the gateway (HTTP edge or `gw.submit`).

    The bearer token is kept so authz can be replayed; the stream lives at the enclave's level
    and the Parquet audit stores only the token id (DESIGN §6).

    `deadline_at` (v2): when the caller stops waiting; every later stage carries it and gives up
    once it has passed (issue 10 item 3).
    """

    schema_version: int = 2
    entry: Literal["http", "nats"]
    token: str
    chat: ChatBody
    reply_to: str
    input_label: str | None = None  # as declared by the caller; None = not declared
    output_label: str | None = None
    deadline_at: datetime | None = None


class RequestAuthorizedV1(Event, frozen=True, kw_only=True, tag="RequestAuthorized", forbid_unknown_fields=True):
    """Version 1, stored before requests carried a deadline: read, upcast, never written."""

    caller: Caller
    model_id: str
    chat: ChatBody
    reply_to: str
    input_label: str | None = None  # the labels the decision used, after defaults
    output_label: str | None = None


class RequestAuthorizedV2(Event, frozen=True, kw_only=True, tag="RequestAuthorized", forbid_unknown_fields=True):
    """Version 2, stored before authz read markings in the prompt: read, upcast, never written."""

    schema_version: int = 2
    caller: Caller
    model_id: str
    chat: ChatBody
    reply_to: str
    input_label: str | None = None
    output_label: str | None = None
    deadline_at: datetime | None = None


class RequestAuthorized(Event, frozen=True, kw_only=True, tag="RequestAuthorized"):
    """Authz let the caller use the resolved model (v2: with the request's deadline; v3: with the
    classification markings found in the prompt, when there were any)."""

    schema_version: int = 3
    caller: Caller
    model_id: str
    chat: ChatBody
    reply_to: str
    input_label: str | None = None  # the labels the decision used, after defaults (and markings, enforced)
    output_label: str | None = None
    deadline_at: datetime | None = None
    content_marking: ContentMarking | None = None


class RequestDeniedV1(Event, frozen=True, kw_only=True, tag="RequestDenied", forbid_unknown_fields=True):
    """Version 1, stored before authz read markings in the prompt: read, upcast, never written."""

    reason: str
    rule: str
    detail: str
    caller: Caller | None = None
    model: str
    reply_to: str
    input_label: str | None = None
    output_label: str | None = None


class RequestDenied(Event, frozen=True, kw_only=True, tag="RequestDenied"):
    """Authz refused the request; `rule` names the rule that fired (`content-marking` when a marking
    found in the prompt raised the input label so that a lattice rule refused it; v2: with them)."""

    schema_version: int = 2
    reason: str
    rule: str
    detail: str
    caller: Caller | None = None
    model: str
    reply_to: str
    input_label: str | None = None
    output_label: str | None = None
    content_marking: ContentMarking | None = None


class RequestFailed(Event, frozen=True, kw_only=True, tag="RequestFailed"):
    """A stage gave up on a message after `max_deliver` attempts: the terminal error."""

    stage: str
    reason: str
    detail: str
    reply_to: str | None = None
    reservation: Reservation | None = None


class MessageRejected(Event, frozen=True, kw_only=True, tag="MessageRejected"):
    """Bytes that could not be decoded or validated; kept as a fact so nothing vanishes."""

    subject: str
    stream_seq: int | None = None
    stage: str
    reason: str
    detail: str


class ResponseDelivered(Event, frozen=True, kw_only=True, tag="ResponseDelivered"):
    """The caller's inbox got its one reply."""

    outcome: Literal["completed", "error"]
    code: str | None = None
    team: str | None = None


class ResponseUndelivered(Event, frozen=True, kw_only=True, tag="ResponseUndelivered"):
    """A reply was decided but never reached its caller (issue 8, item 7).

    `caller_gone`: the HTTP caller had already been answered 504 at its deadline, or hung up;
    `reply_subject_refused`: the terminal event named a subject outside the callers' inboxes;
    `no_reply_subject`: it named none. `outcome` and `code` describe the reply that was dropped.
    """

    outcome: Literal["completed", "error"]
    code: str | None = None
    team: str | None = None
    reason: Literal["caller_gone", "reply_subject_refused", "no_reply_subject"]
