"""Budget decider: reserve the worst case, settle the actual, never exceed the cap (DESIGN §4).

State is a projection of the team ledgers (`gw.evt.ledger.*.<team>`), whose events carry each
team's totals after the fact. `spent + reserved <= cap` holds after every decided event: a
reservation is admitted only if it fits, a settlement charges at most what was reserved, and
releases (failure, no route, expiry) only give money back.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec
from msgspec import Struct

from ...schemas.commands import ChatBody
from ...schemas.events import (
    AnyEvent,
    BudgetClockTicked,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    Envelope,
    Event,
    InvocationCompleted,
    InvocationFailed,
    LedgerTotals,
    RateCount,
    RequestAuthorized,
    RequestFailed,
    Reservation,
    RouteUnavailable,
    envelope,
)
from ...schemas.policy import ModelEntry, PolicyBundle
from .. import catalog
from ..remembered import HORIZON
from ..remembered import Remembered as Closed
from . import rates as rate_rules

BudgetInput = (
    RequestAuthorized | InvocationCompleted | InvocationFailed | RouteUnavailable | RequestFailed | BudgetClockTicked
)
CLOSED_HORIZON = HORIZON  # longer than any reservation may stay open (policy TTL, validated)


class Totals(Struct, frozen=True):
    """A team's money in one period."""

    spent: int = 0
    reserved: int = 0


class Due(Struct, frozen=True, gc=False):
    """When an open request's caller stops waiting, and where it waits."""

    at: datetime
    reply_to: str


# After a request's deadline its last attempt is over (the invoker never calls past it and the
# router never retries past it), so its outcome lands within moments; a reservation still open
# this long after is a request nothing will finish (no invoker hosts its endpoint, or one died).
DEADLINE_GRACE = timedelta(seconds=5)


class BudgetState(Struct, frozen=True, kw_only=True):
    """Totals and alerted thresholds by `team/period`; open reservations by request id."""

    ledgers: dict[str, Totals] = {}
    open: dict[str, Reservation] = {}
    opened_at: dict[str, datetime] = {}
    due: dict[str, Due] = {}  # the open requests that have a deadline (every one since issue 10)
    alerted: dict[str, int] = {}  # the highest threshold (percent) already announced
    # Requests settled, released or refused, with when: a RequestAuthorized seen again after its request
    # closed (a redelivery after the duplicate window, or a copy a credential made the server
    # store) reserves nothing. Kept for CLOSED_HORIZON; an authorization older than that is stale.
    closed: Closed = Closed()
    # the rate counts each open request took (issue 12): what is given back once it has settled
    rates: dict[str, tuple[RateCount, ...]] = {}


def initial_state() -> BudgetState:
    """No money spent or held."""
    return BudgetState()


def ledger_key(team: str, period: str) -> str:
    """Key of a team's ledger in one period."""
    return f"{team}/{period}"


def period_of(kind: str, now: datetime) -> str:
    """The budget period `now` falls in: `YYYY-MM` or `YYYY-MM-DD` (UTC)."""
    return f"{now.year:04d}-{now.month:02d}-{now.day:02d}" if kind == "day" else f"{now.year:04d}-{now.month:02d}"


def effective_max_tokens(model: ModelEntry, chat: ChatBody) -> int:
    """The completion bound sent to the model server, so the reservation really bounds the cost."""
    cap = min(model.context_length, model.max_output_tokens or model.context_length)
    return max(1, min(chat.max_tokens or model.default_max_tokens, cap))


FOLDED = (BudgetReserved, BudgetSettled, BudgetReleased, BudgetRejected, BudgetThresholdCrossed)


def evolve(state: BudgetState, event: Event) -> BudgetState:
    """Fold one ledger event or refusal (FOLDED); every other event leaves the state as it is."""
    if not isinstance(event, FOLDED):
        return state
    match event:
        case BudgetReserved():
            held = Reservation(team=event.team, period=event.period, micros=event.amount_micros)
            due = state.due if event.deadline_at is None else {
                **state.due, event.request_id: Due(event.deadline_at, event.reply_to)}
            return _with(
                state,
                event,
                open_={**state.open, event.request_id: held},
                opened_at={**state.opened_at, event.request_id: event.occurred_at},
                due=due,
                rates={**state.rates, event.request_id: event.rates} if event.rates else state.rates,
            )
        case BudgetSettled() | BudgetReleased():
            rid = event.request_id
            return _with(
                state,
                event,
                open_={k: v for k, v in state.open.items() if k != rid},
                opened_at={k: v for k, v in state.opened_at.items() if k != rid},
                closed=state.closed.add(rid, event.occurred_at),
                due={k: v for k, v in state.due.items() if k != rid} if rid in state.due else state.due,
                rates={k: v for k, v in state.rates.items() if k != rid} if rid in state.rates else state.rates,
            )
        case BudgetRejected():
            # a refusal closes the request too: its caller was told no, so a redelivery after the
            # duplicate window must not reserve it once the team has money again
            return msgspec.structs.replace(state, closed=state.closed.add(event.request_id, event.occurred_at))
        case BudgetThresholdCrossed():
            key = ledger_key(event.team, event.period)
            alerted = {**state.alerted, key: max(state.alerted.get(key, 0), event.threshold_pct)}
            return msgspec.structs.replace(state, alerted=alerted)
        case _:
            return state


def _with(
    state: BudgetState,
    event: LedgerTotals,
    open_: dict[str, Reservation],
    opened_at: dict[str, datetime],
    closed: Closed | None = None,
    due: dict[str, Due] | None = None,
    rates: dict[str, tuple[RateCount, ...]] | None = None,
) -> BudgetState:
    totals = Totals(spent=event.spent_micros, reserved=event.reserved_micros)
    return BudgetState(
        ledgers={**state.ledgers, ledger_key(event.team, event.period): totals},
        open=open_,
        opened_at=opened_at,
        alerted=state.alerted,
        closed=state.closed if closed is None else closed,
        due=state.due if due is None else due,
        rates=state.rates if rates is None else rates,
    )


def decide(event: BudgetInput, state: BudgetState, policy: PolicyBundle, now: datetime,
           rates: tuple[RateCount, ...] = ()) -> list[AnyEvent]:
    """The ledger facts an event calls for, then any threshold it made the team cross.

    Redeliveries decide nothing new (idempotent); a threshold not yet announced is announced
    even then, so a decision interrupted between its two writes completes on the retry.
    `rates`: what the rate counters read once a RequestAuthorized was added to them (the shell
    counts, `rates.to_count` says where); recorded with the decision, so replay decides from them.
    """
    match event:
        case RequestAuthorized():
            primary = _reserve(event, state, policy, now, rates)
        case InvocationCompleted():
            primary = _settle(event, state, policy, now)
        case InvocationFailed() if not event.final:
            primary = []  # one attempt failed: the router routes again or ends the request (RouteUnavailable)
        case InvocationFailed() | RouteUnavailable() | RequestFailed():
            primary = _release(event.request_id, type(event).__name__, state, policy, now)
        case BudgetClockTicked():
            now = event.occurred_at  # the tick is the clock: decided at its time, whoever consumes it when
            primary = expire(state, policy, now, event.team)
    after = state
    for fact in primary:
        after = evolve(after, fact)
    return [*primary, *thresholds(after, policy, now, team_of(event) or "")]


def team_of(event: BudgetInput) -> str | None:
    """The team whose ledger an input touches (None: a failure that never reserved anything)."""
    match event:
        case RequestAuthorized():
            return event.caller.team
        case InvocationCompleted() | InvocationFailed() | RouteUnavailable():
            return event.reservation.team
        case RequestFailed():
            return event.reservation.team if event.reservation else None
        case BudgetClockTicked():
            return event.team


def thresholds(state: BudgetState, policy: PolicyBundle, now: datetime, team: str) -> list[AnyEvent]:
    """A BudgetThresholdCrossed for each soft threshold of `team` reached but not yet announced."""
    out: list[AnyEvent] = []
    for key, totals in state.ledgers.items():
        if not key.startswith(f"{team}/"):
            continue
        period = key.split("/", 1)[1]
        budget = policy.budgets.teams.get(team)
        if budget is None or budget.cap_micros <= 0:
            continue
        committed = totals.spent + totals.reserved
        done = state.alerted.get(key, 0)
        for pct in sorted(budget.thresholds_pct):
            if pct > done and committed * 100 >= pct * budget.cap_micros:
                out.append(
                    BudgetThresholdCrossed(
                        **envelope(f"{team}/{period}/{pct}", "threshold", now, policy.version),
                        team=team,
                        period=period,
                        spent_micros=totals.spent,
                        reserved_micros=totals.reserved,
                        cap_micros=budget.cap_micros,
                        threshold_pct=pct,
                    )
                )
    return out


def expire(state: BudgetState, policy: PolicyBundle, now: datetime, team: str) -> list[AnyEvent]:
    """End each of `team`'s requests still open past its deadline (and grace): the money goes back
    and the caller hears `timeout`, whatever stage it was stuck in. Release each reservation open
    longer than `reservation_ttl_s` (its request was lost; those without a deadline are old)."""
    out: list[AnyEvent] = []
    for rid, due in sorted(state.due.items()):
        held = state.open.get(rid)
        if held is not None and held.team == team and due.at + DEADLINE_GRACE <= now:
            out.extend(_release(rid, "deadline", state, policy, now))
            state = evolve(state, out[-1])
            out.append(RequestFailed(
                **envelope(rid, "deadline", now, policy.version), stage="budget", reason="timeout",
                detail=f"no outcome by the request's deadline {due.at.isoformat()}: no invoker took or finished it",
                reply_to=due.reply_to or None, reservation=held))
    ttl = now - timedelta(seconds=policy.budgets.reservation_ttl_s)
    for rid, at in sorted(state.opened_at.items()):
        if at <= ttl and state.open[rid].team == team:
            out.extend(_release(rid, "expired", state, policy, now))
            state = evolve(state, out[-1])
    return out


def tick(team: str, now: datetime, policy: PolicyBundle) -> BudgetClockTicked:
    """The fact that the budget's clock reached `now` for a team with overdue reservations."""
    return BudgetClockTicked(**envelope(f"budget-tick-{team}-{now.strftime('%Y%m%dT%H%M%S%f')}", "tick", now,
                                        policy.version), team=team)


def expiring_teams(state: BudgetState, policy: PolicyBundle, now: datetime) -> set[str]:
    """Teams with at least one open request past its deadline, or reservation past its TTL."""
    ttl = now - timedelta(seconds=policy.budgets.reservation_ttl_s)
    late = {state.open[rid].team for rid, due in state.due.items()
            if rid in state.open and due.at + DEADLINE_GRACE <= now}
    return late | {state.open[rid].team for rid, at in state.opened_at.items() if at <= ttl}


def token_bound(event: RequestAuthorized, policy: PolicyBundle) -> int:
    """The tokens a request may use at most, as its reservation prices them: the prompt's bound
    plus its output bound (what rate limits count)."""
    model = catalog.find(policy.catalog, event.model_id)
    if model is None:
        return 0
    return catalog.prompt_tokens_bound(event.chat, model) + effective_max_tokens(model, event.chat)


def _reserve(event: RequestAuthorized, state: BudgetState, policy: PolicyBundle, now: datetime,
             rates: tuple[RateCount, ...] = ()) -> list[AnyEvent]:
    if event.request_id in state.open or event.request_id in state.closed:
        return []  # reserved before: this is a redelivery or a copy, never a second charge
    env = envelope(event.request_id, "reserve", now, policy.version)
    if event.occurred_at < now - CLOSED_HORIZON:  # too old to know whether it was reserved before
        return [_rejected(event, env, "authorization_stale", rates)]
    team = event.caller.team
    budget = policy.budgets.teams.get(team)
    model = catalog.find(policy.catalog, event.model_id)
    if budget is None or model is None:
        return [_rejected(event, env, "budget_not_configured", rates)]
    period = period_of(budget.period, now)
    totals = state.ledgers.get(ledger_key(team, period), Totals())
    max_tokens = effective_max_tokens(model, event.chat)
    amount = catalog.cost_micros(model, catalog.prompt_tokens_bound(event.chat, model), max_tokens)
    remaining = budget.cap_micros - totals.spent - totals.reserved
    over_rate = rate_rules.refusal(rates)
    if over_rate is not None or amount > remaining:
        return [
            BudgetRejected(
                **env,
                caller=event.caller,
                model_id=model.id,
                period=period,
                requested_micros=amount,
                remaining_micros=remaining,
                cap_micros=budget.cap_micros,
                reason="rate_limited" if over_rate is not None else "budget_exceeded",
                reply_to=event.reply_to,
                rates=rates,
                # a request whose own count is over the limit fits no minute: retrying will not help
                retry_after_s=rate_rules.retry_after_s(now)
                if over_rate is not None and over_rate.counted <= over_rate.limit else None,
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
            deadline_at=event.deadline_at,
            rates=rates,
        )
    ]


def _rejected(event: RequestAuthorized, env: Envelope, reason: str, rates: tuple[RateCount, ...] = ()
              ) -> BudgetRejected:
    return BudgetRejected(
        **env,
        caller=event.caller,
        model_id=event.model_id,
        period="",
        requested_micros=0,
        remaining_micros=0,
        cap_micros=0,
        reason=reason,
        reply_to=event.reply_to,
        rates=rates,  # taken all the same, and given back
    )


def _settle(event: InvocationCompleted, state: BudgetState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    held = state.open.get(event.request_id)
    if held is None:
        return []
    model = catalog.find(policy.catalog, event.model_id)
    actual = 0 if model is None else catalog.cost_micros(model, event.prompt_tokens, event.completion_tokens)
    # A server that reports more tokens than the bound it was given cannot push a team over
    # its cap: the charge stops at what was reserved (DESIGN §4 invariant).
    charged = max(0, min(actual, held.micros))  # never more than held, never a credit
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


def _release(request_id: str, reason: str, state: BudgetState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    held = state.open.get(request_id)
    if held is None:
        return []
    totals = state.ledgers.get(ledger_key(held.team, held.period), Totals())
    return [
        BudgetReleased(
            **envelope(request_id, "release", now, policy.version),
            team=held.team,
            period=held.period,
            spent_micros=totals.spent,
            reserved_micros=max(0, totals.reserved - held.micros),
            cap_micros=_cap(policy, held.team),
            amount_micros=held.micros,
            reason=reason,
        )
    ]


def _cap(policy: PolicyBundle, team: str) -> int:
    budget = policy.budgets.teams.get(team)
    return 0 if budget is None else budget.cap_micros
