"""What every worker shell opens first: its own NATS identity, JetStream, and the policy feed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext

from . import bus
from .authz.decider import AuthzPolicy
from .policy_feed import PolicyFeed, dev_jwks
from .settings import WorkerSettings


@dataclass(frozen=True)
class Session:
    """A worker's connection, JetStream context and (when it decides under policy) policy feed."""

    nc: Client
    js: JetStreamContext
    feed: PolicyFeed | None

    @property
    def policy(self) -> AuthzPolicy:
        """The active policy at this moment."""
        assert self.feed is not None
        return self.feed.current


@asynccontextmanager
async def session(settings: WorkerSettings, name: str, *, follow_policy: bool = True) -> AsyncIterator[Session]:
    """Connect as `name`, start following the policy, and drain on the way out."""
    nc = await bus.connect(settings, name)
    try:
        js = nc.jetstream()
        feed = None
        if follow_policy:
            feed = PolicyFeed(nc, js, name, dev_jwks(settings))
            await feed.start()
        yield Session(nc=nc, js=js, feed=feed)
    finally:
        await bus.close(nc)
