"""Router shell: consume BudgetReserved, publish the route."""

import asyncio
from pathlib import Path

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import BudgetReserved
from .. import bus
from ..policy_store import load_bundle
from ..settings import WorkerSettings
from . import decider


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    bundle = load_bundle(Path(settings.policy_dir))
    state = decider.initial_state()
    nc = await bus.connect(settings.nats_url, "router")
    js = nc.jetstream()

    async def handle(msg: Msg) -> None:
        reserved = codec.decode_as(msg.data, BudgetReserved)
        for event in decider.decide(reserved, state, bundle, bus.now_utc()):
            await bus.publish(js, event)

    try:
        await bus.consume(js, "router", handle, stop)
    finally:
        await bus.close(nc)
