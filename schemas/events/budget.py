"""Facts about money: reservations, settlements and refusals (DESIGN §4).

Ledger events carry the team's totals *after* the fact, so the newest one is the team's state
and a replica catches up with one direct get.
"""

from datetime import datetime
from typing import Literal

from msgspec import Struct

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class RateCount(Struct, frozen=True, kw_only=True, gc=False):
    """One rate limit a request was counted against (issue 12 item 1): the JetStream counter of its
    scope, key, kind and UTC minute, and what that counter read once the request was added."""

    scope: Literal["team", "application", "model"]
    key: str  # the team, the session token's subject, or the catalog model id
    kind: Literal["requests", "tokens"]
    window: str  # the UTC minute counted in, e.g. 2026-11-29T13:27
    counted: int  # what this request added: 1, or the prompt bound plus its most output tokens
    observed: int  # the counter with it added; over `limit` refuses the request
    limit: int


class LedgerTotals(Event, frozen=True, kw_only=True):
    """Post-state shared by every ledger event of a team and period."""

    team: str
    period: str
    spent_micros: int
    reserved_micros: int
    cap_micros: int


class BudgetReservedV1(LedgerTotals, frozen=True, kw_only=True, tag="BudgetReserved", forbid_unknown_fields=True):
    """Version 1, stored before requests carried a deadline: read, upcast, never written."""

    caller: Caller
    model_id: str
    amount_micros: int
    max_tokens: int
    chat: ChatBody
    reply_to: str


class BudgetReservedV2(LedgerTotals, frozen=True, kw_only=True, tag="BudgetReserved", forbid_unknown_fields=True):
    """Version 2, stored before rate limits: read, upcast, never written."""

    schema_version: int = 2
    caller: Caller
    model_id: str
    amount_micros: int
    max_tokens: int
    chat: ChatBody
    reply_to: str
    deadline_at: datetime | None = None


class BudgetReserved(LedgerTotals, frozen=True, kw_only=True, tag="BudgetReserved"):
    """The worst-case cost of a request is held against the team's cap (v2: with its deadline; v3:
    with the rate limits it was counted against)."""

    schema_version: int = 3
    caller: Caller
    model_id: str
    amount_micros: int
    max_tokens: int
    chat: ChatBody
    reply_to: str
    deadline_at: datetime | None = None
    rates: tuple[RateCount, ...] = ()


class BudgetSettled(LedgerTotals, frozen=True, kw_only=True, tag="BudgetSettled"):
    """The actual cost was charged and the rest of the reservation released."""

    model_id: str
    reserved_amount_micros: int
    charged_micros: int
    prompt_tokens: int
    completion_tokens: int


class BudgetReleased(LedgerTotals, frozen=True, kw_only=True, tag="BudgetReleased"):
    """A reservation was given back unspent (failed, unroutable or abandoned request)."""

    amount_micros: int
    reason: str


class BudgetThresholdCrossed(LedgerTotals, frozen=True, kw_only=True, tag="BudgetThresholdCrossed"):
    """The team's committed money (spent + reserved) reached a soft threshold of its cap this period."""

    threshold_pct: int


class BudgetRejectedV1(Event, frozen=True, kw_only=True, tag="BudgetRejected", forbid_unknown_fields=True):
    """Version 1, stored before rate limits: read, upcast, never written."""

    caller: Caller
    model_id: str
    period: str
    requested_micros: int
    remaining_micros: int
    cap_micros: int
    reason: str
    reply_to: str


class BudgetRejected(Event, frozen=True, kw_only=True, tag="BudgetRejected"):
    """Nothing was reserved: the worst case did not fit under the cap (`budget_exceeded`), or a rate
    limit was reached (`rate_limited`, v2: `rates` ends with the count over its limit, and
    `retry_after_s` says when its minute ends). `rates` lists every count taken for the request;
    the budget gives them back once it is refused."""

    schema_version: int = 2
    caller: Caller
    model_id: str
    period: str
    requested_micros: int
    remaining_micros: int
    cap_micros: int
    reason: str
    reply_to: str
    rates: tuple[RateCount, ...] = ()
    retry_after_s: int | None = None


class BudgetClockTicked(Event, frozen=True, kw_only=True, tag="BudgetClockTicked"):
    """The budget's clock reached `occurred_at` with reservations of `team` past their deadline.

    Timers are inputs (DESIGN §2): expiring lost reservations is decided from this fact, at its
    time, so replay re-decides it like any other decision.
    """

    team: str


__all__ = [
    "BudgetClockTicked",
    "BudgetRejected",
    "BudgetReleased",
    "BudgetReserved",
    "BudgetSettled",
    "BudgetThresholdCrossed",
    "LedgerTotals",
    "RateCount",
    "Reservation",
]
