"""What every worker shell opens first: its own NATS identity, JetStream, and the policy feed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext

from ..schemas.policy import PolicyBundle
from . import bus
from .policy.feed import PolicyFeed
from .settings import WorkerSettings

V = TypeVar("V")


def whole_bundle(bundle: PolicyBundle) -> PolicyBundle:
    """The view of services that decide from the bundle's data alone (budget, router)."""
    return bundle


@dataclass(frozen=True)
class Session(Generic[V]):
    """A worker's connection, JetStream context and (when it decides under policy) policy feed."""

    nc: Client
    js: JetStreamContext
    feed: PolicyFeed[V] | None

    @property
    def policy(self) -> V:
        """This service's view of the active policy at this moment."""
        assert self.feed is not None
        return self.feed.current

    @property
    def policy_version(self) -> str:
        """The active policy's version, recorded on every fact."""
        assert self.feed is not None
        return self.feed.version


@asynccontextmanager
async def session(
    settings: WorkerSettings, name: str, view: Callable[[PolicyBundle], V] | None = None
) -> AsyncIterator[Session[V]]:
    """Connect as `name`, follow the policy compiled to `view` (if any), and drain on the way out."""
    nc = await bus.connect(settings, name)
    try:
        js = nc.jetstream()
        feed = None
        if view is not None:
            feed = PolicyFeed(nc, js, name, view, settings.policy_signers)
            await feed.start()
        yield Session(nc=nc, js=js, feed=feed)
    finally:
        await bus.close(nc)


def without_policy(settings: WorkerSettings, name: str) -> AbstractAsyncContextManager[Session[None]]:
    """A session for services that decide nothing under policy (invoker, auditor)."""
    view: Callable[[PolicyBundle], None] | None = None
    return session(settings, name, view)
