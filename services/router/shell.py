"""Router shell: consume BudgetReserved and failed attempts, publish the route under the active
catalog. Beside it, three readers of its own keep every replica's view whole: every route decided
(by any replica, and before a restart), every failed attempt (the breakers) and every completion
(the endpoints' observed latency)."""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ...schemas import codec, subjects
from ...schemas.events import (
    BudgetReserved,
    EndpointObserved,
    InvocationCompleted,
    InvocationFailed,
    RouteSelected,
    RouteUnavailable,
    envelope,
)
from ...schemas.policy import PolicyBundle
from .. import bus, catalog, fact_signatures, worker
from ..registry import invoker_durable
from ..settings import WorkerSettings
from . import decider

log = logging.getLogger("enclave_gateway.router")
ROUTES, FAILURES, COMPLETIONS = "gw.evt.route.>", "gw.evt.invocation.failed.>", "gw.evt.invocation.completed.>"
SKEW = timedelta(seconds=60)
WATCH_EVERY_S = 2.0  # a failure dated further ahead of this router's clock is not believed


class NotYetRouted(LookupError):
    """A failed attempt whose route this replica has not read yet: retried after a backoff, and a
    failure of no route at all ends, after the retries, as RequestFailed."""


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    state = decider.initial_state()
    async with worker.session(settings, "router", worker.whole_bundle) as s:

        async def handle(msg: Msg) -> None:
            cause = codec.decode_event(msg.data, msg.subject)
            if not isinstance(cause, BudgetReserved | InvocationFailed):
                raise codec.DecodeError(f"router does not take {type(cause).__name__}")
            nonlocal state
            now = bus.now_utc()
            if isinstance(cause, InvocationFailed) and decider.unknown_attempt(cause, state, now):
                raise NotYetRouted(f"no route of request {cause.request_id} attempt {cause.attempt} at "
                                   f"{cause.endpoint!r}")
            seen = msgspec.structs.replace(state, unserved=frozenset(watch.unserved))
            for event in decider.decide(cause, seen, s.policy, now):
                await bus.publish(s.js, bus.caused(event, cause, msg))
                state = decider.evolve(state, event, bus.now_utc())

        def fold(msg: Msg) -> None:
            nonlocal state
            try:
                event = codec.decode_event(msg.data, msg.subject)
            except codec.DecodeError:
                return  # junk moves nothing
            if isinstance(event, RouteSelected | RouteUnavailable) or (
                    isinstance(event, InvocationFailed | InvocationCompleted) and _believed(event, s.policy)):
                state = decider.evolve(state, event, bus.now_utc())

        since = bus.now_utc() - decider.ROUTES_KEPT
        watch = InvokerWatch()
        readers = [asyncio.create_task(_every(s.js, subject, fold, stop, since))
                   for subject in (ROUTES, FAILURES, COMPLETIONS)]
        readers.append(asyncio.create_task(watch.run(s.js, s, stop)))
        try:
            await bus.consume(s.js, "router", handle, stop)
        finally:
            for reader in readers:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


class InvokerWatch:
    """Which endpoints no invoker is pulling routes for: their durable had no pull request waiting
    at two looks in a row, WATCH_EVERY_S apart (an idle invoker always has one; see bus.consume).
    Each change of this replica's view is published (EndpointObserved) before a route relies on it,
    so replay can check every `no_invoker` skip against a stored fact."""

    def __init__(self) -> None:
        self.unserved: set[str] = set()
        self.idle: dict[str, int] = {}
        self.replica = uuid.uuid4().hex

    async def run(self, js: JetStreamContext, session: "worker.Session[PolicyBundle]", stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for endpoint in sorted(catalog.all_endpoints(session.policy.catalog)):
                    try:
                        info = await js.consumer_info(subjects.STREAM, invoker_durable(endpoint)[0])
                        waiting = int(info.num_waiting or 0)
                    except NotFoundError:
                        waiting = 0
                    self.idle[endpoint] = 0 if waiting else self.idle.get(endpoint, 0) + 1
                    unserved = self.idle[endpoint] >= 2
                    if unserved != (endpoint in self.unserved):
                        now = bus.now_utc()
                        await bus.publish(js, EndpointObserved(
                            **envelope(f"endpoint-{subjects.token(endpoint)}",
                                       f"observed-{self.replica[:12]}-{now.strftime('%Y%m%dT%H%M%S%f')}", now,
                                       session.policy_version),
                            endpoint=endpoint, served=not unserved, replica=self.replica))
                    (self.unserved.add if unserved else self.unserved.discard)(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next look tries again; routing goes on with the last view
                log.warning("router: could not look at the invokers' durables: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_EVERY_S)


def _believed(outcome: InvocationFailed | InvocationCompleted, policy: PolicyBundle) -> bool:
    """An outcome at an endpoint the catalog names, not dated ahead of our clock: only those move a
    breaker or a latency figure (invented names would grow them without bound, future dates would
    pin a breaker)."""
    known = outcome.endpoint in catalog.all_endpoints(policy.catalog)
    return known and outcome.occurred_at <= bus.now_utc() + SKEW


async def _every(js: JetStreamContext, subject: str, fold: Callable[[Msg], None], stop: asyncio.Event,
                 since: datetime) -> None:
    """Every message on `subject` stored since `since`, then live, in stream order."""
    while not stop.is_set():
        try:
            sub = await bus.own_reader(js, subject, "router_view", 0, start_time=since)
            try:
                while not stop.is_set():
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except TimeoutError:
                        continue
                    since = msg.metadata.timestamp or since
                    try:
                        bus.owner_of(js, msg.subject, msg.headers, msg.data)
                    except fact_signatures.UnsignedFact as exc:  # moves no breaker, teaches no latency
                        log.warning("router: ignored seq %d: %s", msg.metadata.sequence.stream, exc)
                        continue
                    fold(msg)
            finally:
                await sub.unsubscribe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # start over from the last message read
            log.warning("router: reader of %s failed, restarting: %r", subject, exc)
            await asyncio.sleep(1.0)
