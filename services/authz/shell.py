"""Authz shell: consume RequestSubmitted, publish the decision under the active policy."""

import asyncio

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import RequestSubmitted
from .. import bus, worker
from ..settings import WorkerSettings
from . import decider, policy_view


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    state = decider.initial_state()
    async with worker.session(settings, "authz", policy_view.for_worker(settings)) as s:

        async def handle(msg: Msg) -> None:
            cmd = codec.decode_as(msg.data, RequestSubmitted, msg.subject)
            nonlocal state
            for event in decider.decide(cmd, state, s.policy, bus.now_utc()):
                await bus.publish(s.js, bus.caused(event, cmd, msg))
                state = decider.evolve(state, event)  # a redelivery after the duplicate window decides nothing

        await bus.consume(s.js, "authz", handle, stop)
