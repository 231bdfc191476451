"""Budget shell: one message at a time, catch up the team, decide, write with compare-and-set;
beside it, a timer that expires lost reservations and snapshots the projection."""

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import (
    AnyEvent,
    BudgetClockTicked,
    BudgetRejected,
    BudgetReserved,
    BudgetSettled,
    InvocationCompleted,
    InvocationFailed,
    RateCount,
    RequestAuthorized,
    RequestFailed,
    RouteUnavailable,
)
from ...schemas.policy import PolicyBundle
from .. import bus, worker
from ..settings import WorkerSettings
from . import counters, decider, rates
from .ledger_store import LedgerConflict, LedgerEvent, LedgerStore

SNAPSHOT_EVERY_S = 10.0
log = logging.getLogger("enclave_gateway.budget")
MAX_CONFLICTS = 50


async def apply(
    s: worker.Session[PolicyBundle],
    store: LedgerStore,
    team: str,
    decide: Callable[[], list[AnyEvent]],
    catch_up_first: bool = True,
    cause: tuple[AnyEvent, Msg] | None = None,
) -> list[AnyEvent]:
    """Decide and write, and return what was written; on a conflict with another replica, catch up
    the team and do it again.

    A stale view can only make a write conflict, never make it wrong, so a decision that writes
    may skip the first catch-up (`catch_up_first=False`); one that might decide nothing on a stale
    view (settling a reservation another replica made) must not.
    """
    for attempt in range(MAX_CONFLICTS):
        if catch_up_first or attempt:
            await store.catch_up(team)
        written: list[AnyEvent] = []
        try:
            for decided in decide():
                out = bus.caused(decided, *cause) if cause else decided
                if isinstance(out, LedgerEvent):
                    await store.write(out)
                elif isinstance(out, BudgetRejected):
                    await bus.publish(s.js, out)
                    store.note_refusal(out)
                else:
                    await bus.publish(s.js, out)
                written.append(out)
            return written
        except LedgerConflict:
            continue
    raise RuntimeError(f"ledger of team {team!r} kept moving: {MAX_CONFLICTS} conflicts")


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Rebuild the projection, then serve until `stop` is set."""
    async with worker.session(settings, "budget", worker.whole_bundle) as s:
        store = LedgerStore(s.js)
        log.info("budget projection rebuilt: %d ledger events after the snapshot", await store.rebuild())

        async def handle(msg: Msg) -> None:
            event = codec.decode_event(msg.data, msg.subject)
            if not isinstance(
                event,
                RequestAuthorized
                | InvocationCompleted
                | InvocationFailed
                | RouteUnavailable
                | RequestFailed
                | BudgetClockTicked,
            ):
                raise codec.DecodeError(f"budget does not take {type(event).__name__}")
            team = decider.team_of(event)
            if team is not None:
                if isinstance(event, RequestAuthorized) and msg.metadata.num_delivered > 1:
                    await store.catch_up_refusals(team)  # refused by a replica that then died before its ack
                    await store.catch_up(team)  # or reserved by one: counted again, it would only be given back
                known = isinstance(event, RequestAuthorized) or event.request_id in store.state.open
                # a request is counted and decided at one time, so its counts' minute is its decision's
                at = bus.now_utc() if isinstance(event, RequestAuthorized) else None
                taken = await _count(s, store, event, at)
                counted: list[dict[str, tuple[RateCount, ...]]] = [{}]  # open requests' counts, as decided on

                def decide_now() -> list[AnyEvent]:
                    counted[0] = store.state.rates  # never changed in place: evolve makes a new one
                    return decider.decide(event, store.state, s.policy, at or bus.now_utc(), taken)

                tries = 0

                async def decide_and_write() -> None:
                    nonlocal tries
                    tries += 1  # a retry reads the ledger again: a write refused for a stale view stays refused
                    written = await apply(s, store, team, decide_now, catch_up_first=not known or tries > 1,
                                          cause=(event, msg))
                    await counters.give(s.js, _given_back(taken, counted[0], written))

                if isinstance(event, InvocationCompleted):  # the model ran and its caller is answered: the
                    await bus.outlasting_outages(decide_and_write, msg, "budget", stop)  # charge waits out any outage
                else:  # anything else may give up: the request then fails, uncharged, within its deadline
                    await decide_and_write()

        housekeeping = asyncio.create_task(_housekeeping(s, store, stop, settings.budget_housekeeping_s))
        try:
            await bus.consume(s.js, "budget", handle, stop, sequential=True)
        finally:
            housekeeping.cancel()


async def _count(s: worker.Session[PolicyBundle], store: LedgerStore, event: AnyEvent,
                 at: datetime | None) -> tuple[RateCount, ...]:
    """A new request's rate counts at `at`, taken before its reservation is decided (none for anything
    else, or for a request already reserved or closed: a redelivery is never counted twice)."""
    if not isinstance(event, RequestAuthorized) or at is None or event.request_id in store.state.open or \
            event.request_id in store.state.closed:
        return ()
    todo = rates.to_count(event, s.policy, at, decider.token_bound(event, s.policy))
    return await counters.take(s.js, todo) if todo else ()


def _given_back(taken: tuple[RateCount, ...], counted: dict[str, tuple[RateCount, ...]],
                written: list[AnyEvent]) -> list[tuple[str, int]]:
    """What the decision just written gives back: everything a request not reserved took (refused,
    or reserved before by another replica), and the tokens a settled request did not use."""
    now = bus.now_utc()
    deltas = []
    if taken and not any(isinstance(e, BudgetReserved) for e in written):
        deltas += rates.give_back_refused(taken, now)
    for e in written:
        if isinstance(e, BudgetSettled):
            deltas += rates.give_back(counted.get(e.request_id, ()), e.prompt_tokens + e.completion_tokens, now)
    return deltas


async def _housekeeping(
    s: worker.Session[PolicyBundle], store: LedgerStore, stop: asyncio.Event, every_s: float
) -> None:
    """End requests past their deadline, expire reservations whose request was lost, and snapshot
    the projection when it moved (at most every SNAPSHOT_EVERY_S: a snapshot writes the state)."""
    snapshotted, saved_at = (store.seq, store.refusals_through), time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            pass
        try:
            bundle, now = s.policy, bus.now_utc()
            for team in sorted(decider.expiring_teams(store.state, bundle, now)):
                await bus.publish(s.js, decider.tick(team, now, bundle))  # decided when consumed, like any input
            await store.catch_up_all()  # a snapshot says the whole ledger is folded through a sequence
            await store.catch_up_all_refusals()  # and the refusals
            if (store.seq, store.refusals_through) != snapshotted and time.monotonic() - saved_at >= SNAPSHOT_EVERY_S:
                snapshotted, saved_at = (await store.save_snapshot(), store.refusals_through), time.monotonic()
        except Exception as exc:  # housekeeping retries on the next tick; serving goes on
            log.warning("budget housekeeping failed: %r", exc)
