"""Router shell: consume BudgetReserved and failed attempts, publish the route under the active
catalog; beside it, fold every invocation outcome into the endpoints' circuit breakers."""

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ...schemas import codec, subjects
from ...schemas.events import BudgetReserved, InvocationCompleted, InvocationFailed
from .. import bus, worker
from ..settings import WorkerSettings
from . import decider

log = logging.getLogger("enclave_gateway.router")
OUTCOMES = "gw.evt.invocation.>"


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    state = decider.initial_state()
    async with worker.session(settings, "router", worker.whole_bundle) as s:

        async def handle(msg: Msg) -> None:
            cause = codec.decode_event(msg.data, msg.subject)
            if not isinstance(cause, BudgetReserved | InvocationFailed):
                raise codec.DecodeError(f"router does not take {type(cause).__name__}")
            nonlocal state
            for event in decider.decide(cause, state, s.policy, bus.now_utc()):
                await bus.publish(s.js, bus.caused(event, cause, msg))
                state = decider.evolve(state, event)

        def fold(msg: Msg) -> None:
            nonlocal state
            try:
                outcome = codec.decode_event(msg.data, msg.subject)
            except codec.DecodeError:
                return  # junk on an outcome subject moves no breaker
            if isinstance(outcome, InvocationCompleted | InvocationFailed):
                state = decider.evolve(state, outcome)

        outcomes = asyncio.create_task(_every_outcome(s.js, fold, stop))
        try:
            await bus.consume(s.js, "router", handle, stop)
        finally:
            outcomes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await outcomes


async def _every_outcome(js: JetStreamContext, fold: Callable[[Msg], None], stop: asyncio.Event) -> None:
    """Every invocation outcome from now on, in stream order, whichever replica it went to: the
    shared durable hands each replica only a share, and every replica's breakers must agree."""
    while not stop.is_set():
        try:
            try:
                start = int((await js.get_last_msg(subjects.STREAM, OUTCOMES, direct=True)).seq or 0) + 1
            except NotFoundError:
                start = 1
            sub = await bus.own_reader(js, OUTCOMES, "router_outcomes", start)
            try:
                while not stop.is_set():
                    try:
                        fold(await sub.next_msg(timeout=1.0))
                    except TimeoutError:
                        continue
            finally:
                await sub.unsubscribe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # breakers are soft state: start over from the newest outcome
            log.warning("router: outcome reader failed, restarting: %r", exc)
            await asyncio.sleep(1.0)
