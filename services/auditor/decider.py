"""Auditor decisions: one flat audit row per event, and the hash chain over them.

Rows carry metadata and sha256 digests of prompts and completions, never the text: analysts
need spend and decisions, the content stays in the stream at the enclave's level.
`h_n = sha256(h_{n-1} || seq || subject || sha256(data))` in stream order.
"""

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime

import msgspec
from msgspec import Struct

from ...schemas import codec
from ...schemas.commands import ChatMessage
from ...schemas.events import (
    AnyEvent,
    AuditCheckpoint,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    ConsoleViewed,
    Event,
    InvocationCompleted,
    InvocationFailed,
    MessageRejected,
    PolicyActivated,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    ResponseDelivered,
    ResponseUndelivered,
    RouteSelected,
    RouteUnavailable,
)

GENESIS = "0" * 64


class AuditRow(Struct, kw_only=True):
    """One row of the `events` Parquet table."""

    seq: int
    subject: str
    type: str
    schema_version: int | None = None
    event_id: str | None = None
    request_id: str | None = None
    occurred_at: datetime | None = None
    day: str
    policy_version: str | None = None
    team: str | None = None
    period: str | None = None  # the budget period a ledger event belongs to
    caller: str | None = None
    model: str | None = None
    model_id: str | None = None
    endpoint: str | None = None
    reason: str | None = None
    rule: str | None = None
    detail: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    amount_micros: int | None = None
    charged_micros: int | None = None
    spent_micros: int | None = None
    reserved_micros: int | None = None
    cap_micros: int | None = None
    remaining_micros: int | None = None
    latency_ms: float | None = None
    outcome: str | None = None
    input_label: str | None = None
    output_label: str | None = None
    clearance: str | None = None
    # keyed digests (HMAC-SHA256 with the deployment's audit digest key) of the prompt's canonical
    # encoding and of the completion: a plain hash would let anyone holding the Parquet confirm a
    # guessed prompt
    prompt_hmac: str | None = None
    completion_hmac: str | None = None
    data_sha256: str
    chain_hash: str


class AuditorState(Struct, frozen=True):
    """The chain head: last sequence folded and its hash."""

    seq: int = 0
    head: str = GENESIS


def initial_state() -> AuditorState:
    """Before the first event."""
    return AuditorState()


def evolve(state: AuditorState, event: Event) -> AuditorState:
    """The chain advances per stored message (see `row_for`), not per decoded event."""
    return state


def chain(prev: str, seq: int, subject: str, data_sha256: str) -> str:
    """One link of the hash chain."""
    h = hashlib.sha256(bytes.fromhex(prev))
    h.update(seq.to_bytes(8, "big"))
    h.update(subject.encode())
    h.update(bytes.fromhex(data_sha256))
    return h.hexdigest()


UNKEYED = "unkeyed"


def keyed_digest(key: bytes, value: bytes) -> str:
    """HMAC-SHA256 of a value under the deployment's audit digest key, hex."""
    return hmac.new(key, value, hashlib.sha256).hexdigest()


def _keyed(key: bytes | None, value: Callable[[], bytes]) -> str:
    return UNKEYED if key is None else keyed_digest(key, value())


def canonical_messages(messages: tuple[ChatMessage, ...]) -> bytes:
    """The prompt as [[role, content], ...] in JSON: roles and message boundaries are part of it."""
    return msgspec.json.encode([[m.role, m.content] for m in messages])


def row_for(
    state: AuditorState, seq: int, subject: str, data: bytes, stored_at: datetime, digest_key: bytes | None,
    unsigned: codec.UnsignedFact | None = None,
) -> tuple[AuditRow, AuditorState]:
    """The row for one stored message and the new chain head; undecodable bytes still get a row,
    and so does a fact no owner signed (`unsigned`: why), which counts as no event at all."""
    try:
        # a misplaced event is recorded, and so is one no owner signed
        event: AnyEvent | codec.DecodeError = unsigned or codec.decode_event(data, subject)
    except codec.DecodeError as exc:
        event = exc
    return row_of(state, seq, subject, data, stored_at, digest_key, event)


def row_of(
    state: AuditorState,
    seq: int,
    subject: str,
    data: bytes,
    stored_at: datetime,
    digest_key: bytes | None,
    event: AnyEvent | codec.DecodeError,
) -> tuple[AuditRow, AuditorState]:
    """`row_for` given the message already decoded (or its decode error), so a verifier decodes once.

    Without a digest key (a verifier holds none) the keyed digests read UNKEYED: present, not computed.
    """
    digest = hashlib.sha256(data).hexdigest()
    head = chain(state.head, seq, subject, digest)
    if isinstance(event, codec.DecodeError):
        row = AuditRow(
            seq=seq,
            subject=subject,
            type="Unsigned" if isinstance(event, codec.UnsignedFact) else "Undecodable",
            day=stored_at.date().isoformat(),
            detail=str(event)[:500],
            data_sha256=digest,
            chain_hash=head,
        )
        return row, AuditorState(seq=seq, head=head)
    row = AuditRow(
        seq=seq,
        subject=subject,
        type=type(event).__name__,
        # the version stored, which the row's digest is of (every version before 2 was 1)
        schema_version=1 if event.schema_version == 1 else codec.stored_version(data),
        event_id=event.event_id,
        request_id=event.request_id,
        occurred_at=event.occurred_at,
        day=event.occurred_at.date().isoformat(),
        policy_version=event.policy_version,
        data_sha256=digest,
        chain_hash=head,
    )
    _fill(row, event, digest_key)
    _fit(row)
    return row, AuditorState(seq=seq, head=head)


_INT_COLUMNS = ("prompt_tokens", "completion_tokens", "amount_micros", "charged_micros", "spent_micros",
                "reserved_micros", "cap_micros", "remaining_micros")
_INT64 = (-(2**63), 2**63 - 1)


def _fit(row: AuditRow) -> None:
    """A figure the audit's int64 columns cannot hold (a forged or broken event may carry one) is
    left out of its column and named in `detail`, instead of stopping the auditor; the event
    itself, with the figure, stays in the stream."""
    for column in _INT_COLUMNS:
        value = getattr(row, column)
        if value is not None and not _INT64[0] <= value <= _INT64[1]:
            setattr(row, column, None)
            row.detail = f"{row.detail + '; ' if row.detail else ''}{column} out of the audit's range"


def _fill(row: AuditRow, e: AnyEvent, digest_key: bytes | None) -> None:
    match e:
        case RequestSubmitted():
            row.model, row.prompt_hmac = e.chat.model, _keyed(
                digest_key, lambda: canonical_messages(e.chat.messages))
        case RequestAuthorized():
            row.team, row.caller, row.model, row.model_id = e.caller.team, e.caller.subject, e.chat.model, e.model_id
            row.input_label, row.output_label, row.clearance = e.input_label, e.output_label, e.caller.clearance
            if e.content_marking is not None:  # queryable beside the denials: rule = 'content-marking'
                row.rule = "content-marking"
                row.detail = f"{'raised to' if e.content_marking.enforced else 'reported, not enforced:'} " \
                             f"{e.content_marking.label} by {e.content_marking.found}"
        case RequestDenied():
            row.team = e.caller.team if e.caller else None
            row.caller = e.caller.subject if e.caller else None
            row.model, row.reason, row.rule, row.detail = e.model, e.reason, e.rule, e.detail
            row.input_label, row.output_label = e.input_label, e.output_label
            row.clearance = e.caller.clearance if e.caller else None
        case RequestFailed():
            row.reason, row.detail = e.reason, f"failed at {e.stage}"  # its detail may quote a model server
            row.team = e.reservation.team if e.reservation else None
        case MessageRejected():
            row.reason, row.detail = e.reason, e.detail[:500]
        case ResponseDelivered():
            row.outcome, row.reason, row.team = e.outcome, e.code, e.team
        case ResponseUndelivered():
            row.outcome, row.reason, row.team = e.outcome, e.reason, e.team
            row.detail = f"undelivered reply: {e.code}" if e.code else None
        case BudgetReserved():
            row.period = e.period
            row.team, row.caller, row.model_id, row.amount_micros = (
                e.team,
                e.caller.subject,
                e.model_id,
                e.amount_micros,
            )
            row.spent_micros, row.reserved_micros, row.cap_micros = e.spent_micros, e.reserved_micros, e.cap_micros
        case BudgetSettled():
            row.period = e.period
            row.team, row.model_id, row.amount_micros, row.charged_micros = (
                e.team,
                e.model_id,
                e.reserved_amount_micros,
                e.charged_micros,
            )
            row.prompt_tokens, row.completion_tokens = e.prompt_tokens, e.completion_tokens
            row.spent_micros, row.reserved_micros, row.cap_micros = e.spent_micros, e.reserved_micros, e.cap_micros
        case BudgetReleased():
            row.period = e.period
            row.team, row.amount_micros, row.reason = e.team, e.amount_micros, e.reason
            row.spent_micros, row.reserved_micros, row.cap_micros = e.spent_micros, e.reserved_micros, e.cap_micros
        case BudgetThresholdCrossed():
            row.period = e.period
            row.team, row.amount_micros, row.detail = e.team, e.threshold_pct, f"{e.threshold_pct}% of cap committed"
            row.spent_micros, row.reserved_micros, row.cap_micros = e.spent_micros, e.reserved_micros, e.cap_micros
        case BudgetRejected():
            row.team, row.caller, row.model_id, row.reason = e.caller.team, e.caller.subject, e.model_id, e.reason
            row.amount_micros, row.remaining_micros, row.cap_micros = (
                e.requested_micros,
                e.remaining_micros,
                e.cap_micros,
            )
            if e.reason == "rate_limited" and e.rates:  # which limit, queryable: rule = 'rate-limit-<scope>'
                over = e.rates[-1]
                row.rule = f"rate-limit-{over.scope}"
                row.detail = (f"{over.limit} {over.kind} per minute for {over.scope} {over.key[:128]!r}: "
                              f"{over.observed} in the minute from {over.window} UTC")
        case RouteSelected():
            row.team, row.model, row.model_id, row.endpoint = e.caller.team, e.requested_model, e.model_id, e.endpoint
            notes = ([f"substituted {e.substituted_from}"] if e.substituted_from else []) + (
                [f"attempt {e.attempt} after {', '.join(e.tried)} failed"] if e.tried else [])
            row.detail = "; ".join(notes) or None
        case RouteUnavailable():
            row.team, row.model, row.reason, row.detail = e.caller.team, e.requested_model, e.reason, e.detail
        case InvocationCompleted():
            row.team, row.model_id, row.endpoint = e.caller.team, e.model_id, e.endpoint
            row.prompt_tokens, row.completion_tokens, row.latency_ms = (
                e.prompt_tokens,
                e.completion_tokens,
                e.latency_ms,
            )
            row.outcome, row.completion_hmac = e.finish_reason, _keyed(digest_key, e.content.encode)
        case InvocationFailed():
            row.team, row.model_id, row.endpoint, row.reason = e.caller.team, e.model_id, e.endpoint, e.error
            row.latency_ms = e.latency_ms  # `detail` may hold the model server's own text: it stays in the stream
        case PolicyActivated():
            row.caller, row.detail = e.activated_by, f"{e.version} git {e.git_commit or '-'} sha256 {e.sha256}"
        case AuditCheckpoint():
            row.caller, row.detail = e.signer, f"seq {e.seq} head {e.head} after seq {e.previous_seq}"
        case ConsoleViewed():  # who looked at what in the web console: rule = 'console'
            row.caller, row.team, row.rule, row.outcome = e.viewer, e.team, "console", str(e.status)
            row.detail = f"{e.page}{' ' + e.target if e.target else ''}"[:500]
