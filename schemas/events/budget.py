"""Facts about money: reservations, settlements and refusals (DESIGN §4).

Ledger events carry the team's totals *after* the fact, so the newest one is the team's state
and a replica catches up with one direct get.
"""

from datetime import datetime

from ..commands import ChatBody
from .base import Caller, Event, Reservation


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


class BudgetReserved(LedgerTotals, frozen=True, kw_only=True, tag="BudgetReserved"):
    """The worst-case cost of a request is held against the team's cap (v2: with its deadline)."""

    schema_version: int = 2
    caller: Caller
    model_id: str
    amount_micros: int
    max_tokens: int
    chat: ChatBody
    reply_to: str
    deadline_at: datetime | None = None


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


class BudgetRejected(Event, frozen=True, kw_only=True, tag="BudgetRejected"):
    """The worst case did not fit under the cap; nothing was reserved."""

    caller: Caller
    model_id: str
    period: str
    requested_micros: int
    remaining_micros: int
    cap_micros: int
    reason: str
    reply_to: str


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
    "Reservation",
]
