"""Router shell: consume BudgetReserved and failed attempts, publish the route under the active catalog."""

import asyncio

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import BudgetReserved, InvocationFailed
from .. import bus, worker
from ..settings import WorkerSettings
from . import decider


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

        await bus.consume(s.js, "router", handle, stop)
