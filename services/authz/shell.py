"""Authz shell: consume RequestSubmitted, publish the decision."""

import asyncio
from pathlib import Path

from nats.aio.msg import Msg

from ...schemas import codec
from ...schemas.events import RequestSubmitted
from .. import bus
from ..policy_store import load_bundle
from ..settings import WorkerSettings, load_keys
from . import decider
from .access import AccessRules


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    bundle = load_bundle(Path(settings.policy_dir))
    policy = decider.AuthzPolicy(bundle=bundle, rules=AccessRules(bundle), keys=load_keys(settings.keys_dir))
    state = decider.initial_state()
    nc = await bus.connect(settings.nats_url, "authz")
    js = nc.jetstream()

    async def handle(msg: Msg) -> None:
        cmd = codec.decode_as(msg.data, RequestSubmitted)
        for event in decider.decide(cmd, state, policy, bus.now_utc()):
            await bus.publish(js, event)

    try:
        await bus.consume(js, "authz", handle, stop)
    finally:
        await bus.close(nc)
