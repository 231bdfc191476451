"""Router shell: consume BudgetReserved, publish the route under the active catalog."""

import asyncio

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import BudgetReserved
from .. import bus, worker
from ..settings import WorkerSettings
from . import decider


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    state = decider.initial_state()
    async with worker.session(settings, "router", worker.whole_bundle) as s:

        async def handle(msg: Msg) -> None:
            reserved = codec.decode_as(msg.data, BudgetReserved, msg.subject)
            nonlocal state
            for event in decider.decide(reserved, state, s.policy, bus.now_utc()):
                await bus.publish(s.js, bus.caused(event, reserved, msg))
                state = decider.evolve(state, event)

        await bus.consume(s.js, "router", handle, stop)
