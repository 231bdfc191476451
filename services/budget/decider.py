"""Budget decider: reserve the worst case, settle the actual, never exceed the cap (DESIGN §4).

State is a projection of the ledger events, which carry each team's totals after the fact.
`spent + reserved <= cap` holds after every decided event: a reservation is admitted only if
it fits, and a settlement charges at most what was reserved.
"""

from datetime import datetime

from msgspec import Struct

from ...schemas.commands import ChatBody
from ...schemas.events import (
    AnyEvent,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    Event,
    InvocationCompleted,
    InvocationFailed,
    LedgerTotals,
    RequestAuthorized,
    RequestFailed,
    Reservation,
    RouteUnavailable,
    envelope,
)
from ...schemas.policy import ModelEntry, PolicyBundle
from .. import catalog

BudgetInput = RequestAuthorized | InvocationCompleted | InvocationFailed | RouteUnavailable | RequestFailed


class Totals(Struct, frozen=True):
    """A team's money in one period."""

    spent: int = 0
    reserved: int = 0


class BudgetState(Struct, frozen=True, kw_only=True):
    """Totals by `team/period`, and the reservations still open by request id."""

    ledgers: dict[str, Totals] = {}
    open: dict[str, Reservation] = {}


def initial_state() -> BudgetState:
    """No money spent or held."""
    return BudgetState()


def ledger_key(team: str, period: str) -> str:
    """Key of a team's ledger in one period."""
    return f"{team}/{period}"


def period_of(kind: str, now: datetime) -> str:
    """The budget period `now` falls in: `YYYY-MM` or `YYYY-MM-DD` (UTC)."""
    return now.strftime("%Y-%m-%d" if kind == "day" else "%Y-%m")


def worst_case_prompt_tokens(model: ModelEntry, chat: ChatBody) -> int:
    """An upper bound on prompt tokens: byte-level BPE never makes more tokens than bytes."""
    body = sum(len(m.content.encode()) + len(m.role.encode()) + model.message_overhead_tokens for m in chat.messages)
    return body + model.prompt_overhead_tokens


def effective_max_tokens(model: ModelEntry, chat: ChatBody) -> int:
    """The completion bound sent to the model server, so the reservation really bounds the cost."""
    return max(1, min(chat.max_tokens or model.default_max_tokens, model.context_length))


def evolve(state: BudgetState, event: Event) -> BudgetState:
    """Fold one ledger event; every other event leaves the state as it is."""
    match event:
        case BudgetReserved():
            opened = Reservation(team=event.team, period=event.period, micros=event.amount_micros)
            return _with_totals(state, event, {**state.open, event.request_id: opened})
        case BudgetSettled() | BudgetReleased():
            return _with_totals(state, event, {k: v for k, v in state.open.items() if k != event.request_id})
        case _:
            return state


def _with_totals(state: BudgetState, event: LedgerTotals, open_: dict[str, Reservation]) -> BudgetState:
    key = ledger_key(event.team, event.period)
    totals = Totals(spent=event.spent_micros, reserved=event.reserved_micros)
    return BudgetState(ledgers={**state.ledgers, key: totals}, open=open_)


def decide(event: BudgetInput, state: BudgetState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    """Decide the ledger fact an event calls for; redeliveries decide nothing (idempotent)."""
    match event:
        case RequestAuthorized():
            return _reserve(event, state, policy, now)
        case InvocationCompleted():
            return _settle(event, state, policy, now)
        case InvocationFailed() | RouteUnavailable() | RequestFailed():
            return _release(event, state, policy, now)


def _reserve(event: RequestAuthorized, state: BudgetState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    if event.request_id in state.open:
        return []
    env = envelope(event.request_id, "reserve", now, policy.version)
    team = event.caller.team
    budget = policy.budgets.teams.get(team)
    model = catalog.find(policy.catalog, event.model_id)
    if budget is None or model is None:
        return [
            BudgetRejected(
                **env,
                caller=event.caller,
                model_id=event.model_id,
                period="",
                requested_micros=0,
                remaining_micros=0,
                cap_micros=0,
                reason="budget_not_configured",
                reply_to=event.reply_to,
            )
        ]
    period = period_of(budget.period, now)
    totals = state.ledgers.get(ledger_key(team, period), Totals())
    max_tokens = effective_max_tokens(model, event.chat)
    amount = catalog.cost_micros(model, worst_case_prompt_tokens(model, event.chat), max_tokens)
    remaining = budget.cap_micros - totals.spent - totals.reserved
    if amount > remaining:
        return [
            BudgetRejected(
                **env,
                caller=event.caller,
                model_id=model.id,
                period=period,
                requested_micros=amount,
                remaining_micros=remaining,
                cap_micros=budget.cap_micros,
                reason="budget_exceeded",
                reply_to=event.reply_to,
            )
        ]
    return [
        BudgetReserved(
            **env,
            team=team,
            period=period,
            spent_micros=totals.spent,
            reserved_micros=totals.reserved + amount,
            cap_micros=budget.cap_micros,
            caller=event.caller,
            model_id=model.id,
            amount_micros=amount,
            max_tokens=max_tokens,
            chat=event.chat,
            reply_to=event.reply_to,
        )
    ]


def _settle(event: InvocationCompleted, state: BudgetState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    held = state.open.get(event.request_id)
    model = catalog.find(policy.catalog, event.model_id)
    if held is None:
        return []
    actual = 0 if model is None else catalog.cost_micros(model, event.prompt_tokens, event.completion_tokens)
    # A server that reports more tokens than the bound it was given cannot push a team over
    # its cap: the charge stops at what was reserved (DESIGN §4 invariant).
    charged = min(actual, held.micros)
    totals = state.ledgers.get(ledger_key(held.team, held.period), Totals())
    return [
        BudgetSettled(
            **envelope(event.request_id, "settle", now, policy.version),
            team=held.team,
            period=held.period,
            spent_micros=totals.spent + charged,
            reserved_micros=max(0, totals.reserved - held.micros),
            cap_micros=_cap(policy, held.team),
            model_id=event.model_id,
            reserved_amount_micros=held.micros,
            charged_micros=charged,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
        )
    ]


def _release(
    event: InvocationFailed | RouteUnavailable | RequestFailed, state: BudgetState, policy: PolicyBundle, now: datetime
) -> list[AnyEvent]:
    held = state.open.get(event.request_id)
    if held is None:
        return []
    totals = state.ledgers.get(ledger_key(held.team, held.period), Totals())
    return [
        BudgetReleased(
            **envelope(event.request_id, "release", now, policy.version),
            team=held.team,
            period=held.period,
            spent_micros=totals.spent,
            reserved_micros=max(0, totals.reserved - held.micros),
            cap_micros=_cap(policy, held.team),
            amount_micros=held.micros,
            reason=type(event).__name__,
        )
    ]


def _cap(policy: PolicyBundle, team: str) -> int:
    budget = policy.budgets.teams.get(team)
    return 0 if budget is None else budget.cap_micros


__all__ = ["BudgetInput", "BudgetState", "Totals", "decide", "evolve", "initial_state"]
