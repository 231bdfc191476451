"""Budget shell: one message at a time, catch up the team, decide, write with compare-and-set."""

import asyncio
import logging

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import (
    InvocationCompleted,
    InvocationFailed,
    RequestAuthorized,
    RequestFailed,
    RouteUnavailable,
)
from .. import bus, worker
from ..settings import WorkerSettings
from . import decider
from .ledger_store import LedgerConflict, LedgerEvent, LedgerStore

log = logging.getLogger("enclave_gateway.budget")
MAX_CONFLICTS = 50


def team_of(event: decider.BudgetInput) -> str | None:
    """The team whose ledger an input touches."""
    match event:
        case RequestAuthorized():
            return event.caller.team
        case InvocationCompleted() | InvocationFailed() | RouteUnavailable():
            return event.reservation.team
        case RequestFailed():
            return event.reservation.team if event.reservation else None


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Rebuild the projection, then serve until `stop` is set."""
    async with worker.session(settings, "budget") as s:
        await _serve(s, stop)


async def _serve(s: worker.Session, stop: asyncio.Event) -> None:
    js = s.js
    store = LedgerStore(js)
    log.info("budget projection rebuilt from %d ledger events", await store.rebuild())

    async def handle(msg: Msg) -> None:
        event = codec.decode_event(msg.data)
        if not isinstance(
            event, RequestAuthorized | InvocationCompleted | InvocationFailed | RouteUnavailable | RequestFailed
        ):
            raise codec.DecodeError(f"budget does not take {type(event).__name__}")
        team = team_of(event)
        if team is None:
            return
        for _ in range(MAX_CONFLICTS):
            await store.catch_up(team)
            try:
                for out in decider.decide(event, store.state, s.policy.bundle, bus.now_utc()):
                    if isinstance(out, LedgerEvent):
                        await store.write(out)
                    else:
                        await bus.publish(js, out)
                return
            except LedgerConflict:
                continue
        raise RuntimeError(f"ledger of team {team!r} kept moving: {MAX_CONFLICTS} conflicts")

    await bus.consume(js, "budget", handle, stop, sequential=True)
