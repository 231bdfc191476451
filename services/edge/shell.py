"""Edge shell: the two entries (HTTP, `gw.submit`) and the responder that answers callers.

HTTP requests wait on a future keyed by request id; their reply inbox is this replica's
`_INBOX_edge.<replica>.<request_id>`, so any edge replica's responder can answer any caller. Only
the replica holding the connection knows whether its caller still waits, so it records what the
caller got: the reply, the 504 at the deadline, or a late reply as undelivered.
"""

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import nats.errors
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerInfo
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from ...schemas import codec, subjects
from ...schemas.commands import StreamChunk, SubmitReply, SubmitRequest
from ...schemas.events import AnyEvent, LedgerTotals, RouteSelected
from .. import bus, catalog, logs, registry, worker
from ..authz import policy_view
from ..authz.decider import AuthzPolicy, visible_models
from ..authz.tokens import TokenDefect
from ..budget.decider import period_of
from ..settings import WorkerSettings
from . import decider, http_app, unparsed
from .metrics import EdgeMetrics

log = logging.getLogger("enclave_gateway.edge")
REPLY_GRACE_S = 1.0
ANSWERED_MEMORY = 4096  # recent answered request ids: a redelivered duplicate reply is not "undelivered"
MAX_SUBMITTING = 1024  # batch submissions one edge replica puts in the pipeline at once
SCRAPE_MEMORY_S = 5.0  # /metrics reads spend and circuits from the broker at most this often
READY_MEMORY_S = 1.0  # a probe answered from the last look this recent (load balancers poll often)
# The stream surely did not store the event: the server said no (stream full, no quorum), nobody
# answered, or the connection is closed. A timeout is not among them: the event may be stored.
NOT_STORED = (APIError, NoStreamResponseError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
              nats.errors.OutboundBufferLimitError)  # NoStreamResponseError: no replica could take it (quorum lost)
NOT_RECORDED = "the audit stream cannot record requests now; this one was not recorded, run or charged: retry later"
WATCH_GAP_S = 2.5  # watch_bus runs every 0.5 s (at most 1.5 s with a slow answer): a longer gap is a stall
OUTAGE_SETTLE_S = 10.0  # after an outage, how long the bus must be back before the edge stops waiting
OUTAGE_WAIT_S = 120.0  # and the most it waits past the deadline for the pipeline's answer
PUBLISH_TRY_S = 2.0  # one publish's wait for the stream's acknowledgement before it is sent again


class Called(NamedTuple):
    """What an HTTP caller gets, and the milliseconds the gateway added to it (None: no model answered)."""

    reply: SubmitReply
    added_ms: float | None = None


class Handed(NamedTuple):
    """A pipeline reply as it reached the replica holding the caller: the caller's team (for the
    fact this replica records) and the model call's time (for the added time), from its headers."""

    reply: SubmitReply
    team: str | None
    model_s: float | None = None


class Edge:
    """One edge replica's connections, pending HTTP callers and policy view."""

    def __init__(self, settings: WorkerSettings, session: worker.Session[AuthzPolicy],
                 stop: asyncio.Event | None = None) -> None:
        self.settings, self.session = settings, session
        # set once the replica has answered every caller it held and its responder stops
        self.stop = stop or asyncio.Event()
        self.taking: Subscription | None = None
        self.nc, self.js = session.nc, session.js
        self.replica = uuid.uuid4().hex
        self.state = decider.initial_state()  # the outcomes this replica recorded, for idempotency
        self.pending: dict[str, asyncio.Future[Handed]] = {}
        self.streams: dict[str, asyncio.Queue[StreamChunk]] = {}  # HTTP callers of `stream: true`
        self.answered: dict[str, None] = {}  # insertion-ordered, the oldest dropped first
        self.looked_at = -math.inf  # when /metrics last read spend and circuits
        self.submitting = asyncio.Semaphore(MAX_SUBMITTING)  # batch submissions being put in the pipeline
        self.submissions: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps weak ones)
        self.ready: tuple[float, dict[str, bool]] = (0.0, {})  # when last looked, and what was seen
        self.metrics = EdgeMetrics()
        self.unhealthy_at = -1e9  # loop time the bus last failed a ping (watch_bus)
        self.watched_at = math.inf  # loop time watch_bus last ran (none yet: no stall to see)

    async def start(self) -> None:
        """Listen for replies and subscribe to every `gw.submit.<app>` (queue group `edge`)."""
        await self.listen()
        self.taking = await self.nc.subscribe(subjects.submit("*"), queue="edge", cb=self._on_submit)

    async def stop_taking(self) -> None:
        """Take no more batch submissions (the queue group's other replicas do); HTTP is the runner's."""
        if self.taking is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.taking.unsubscribe()
            self.taking = None

    async def listen(self) -> None:
        """Subscribe to this replica's HTTP callers' inbox, and to where their streamed tokens go."""
        await self.nc.subscribe(subjects.edge_reply(self.replica, "*"), cb=self._on_reply)
        chunks = subjects.chunks_of(subjects.edge_reply(self.replica, "*"))
        assert chunks is not None
        await self.nc.subscribe(chunks, cb=self._on_chunk)

    async def submit(self, entry: Literal["http", "nats"], cmd: SubmitRequest, reply_to: str, request_id: str
                     ) -> SubmitReply | None:
        """Put a validated request into the pipeline: None once the stream acknowledged it, else
        the caller's 503 (AU-5: a request the stream did not record is never run, so never answered).

        A publish that timed out may still be stored (its acknowledgement lost, or nats-py sending
        what it buffered once reconnected), so it is published again with the same `Nats-Msg-Id`:
        the stream stores it once and acknowledges a copy as a duplicate. Past the deadline it goes
        on, up to OUTAGE_WAIT_S more, until one copy is acknowledged: stored late, the request ends
        without running (every stage refuses work past its deadline) and that end is the caller's
        word. A 503 instead could be false (a stalled copy ran in time and was charged), and giving
        up at the deadline left a batch caller with no word at all when no copy had been stored.
        """
        if not self.nc.is_connected:  # publishing now would buffer it for later: refuse it instead
            return decider.error_reply(request_id, "audit_unavailable", NOT_RECORDED)
        event = decider.submitted(request_id, entry, cmd, reply_to, bus.now_utc(), self.version,
                                  self.settings.request_timeout_s)
        loop = asyncio.get_running_loop()
        until = loop.time() + decider.caller_wait_s(cmd, self.settings.request_timeout_s)
        maybe_stored = False
        while True:
            try:  # a full wait for the acknowledgement, whatever the deadline: storing late is safe
                # (every stage refuses work past it), but a wait cut short is no sign of an outage
                await bus.publish_ack(self.js, event, wait_s=PUBLISH_TRY_S)
                return None
            except NOT_STORED as exc:
                if not maybe_stored:  # the first try failed for sure: nothing is stored
                    log.error("request %s not recorded: %s", request_id, type(exc).__name__)
                    return decider.error_reply(request_id, "audit_unavailable", NOT_RECORDED)
            except TimeoutError:
                maybe_stored = True
            if loop.time() >= until:  # the caller waits for the pipeline's word (`_after_outage`)
                self.unhealthy_at = loop.time()
                if loop.time() >= until + OUTAGE_WAIT_S:  # no copy acknowledged: the known silence
                    log.error("request %s: no acknowledgement from the stream by %g s past its deadline",
                              request_id, OUTAGE_WAIT_S)
                    return None
            await asyncio.sleep(0.5)

    async def reject(self, request_id: str, subject: str, code: str, detail: str, reply_to: str | None) -> SubmitReply:
        """Record a refusal at the entry, answer a NATS caller, and return the reply."""
        try:
            await bus.publish(self.js, decider.rejected(request_id, subject, code, detail, bus.now_utc(),
                                                        self.version))
            reply = decider.error_reply(request_id, code, detail)
        except Exception as exc:  # unrecorded, the refusal is not what the caller hears (AU-5)
            log.error("refusal %s not recorded: %s", request_id, type(exc).__name__)
            return decider.error_reply(request_id, "audit_unavailable", NOT_RECORDED)
        # counted too: no model or team is known yet (the body did not parse), so both are `other`/none
        self.metrics.answered("http" if subject.startswith("http:") else "nats", "", (), None, (), reply)
        await self.deliver(reply, reply_to, team=None)
        return reply

    async def deliver(self, reply: SubmitReply, reply_to: str | None, team: str | None) -> None:
        """Send an entry refusal to a NATS caller (an HTTP caller gets `reject`'s return value) and record it."""
        if reply_to:
            await self.nc.publish(reply_to, codec.encode(reply))
        await bus.publish(self.js, decider.delivered(reply, team, bus.now_utc(), self.version))

    async def call(self, cmd: SubmitRequest) -> Called:
        """The HTTP path: submit, wait on this replica's inbox, and record what the caller gets; with
        the time the gateway added to an answer (the caller's wait less the model call)."""
        request_id, started = uuid.uuid4().hex, time.monotonic()
        logs.request_id.set(request_id)  # this caller's task: its log lines name the request
        waited_from = asyncio.get_running_loop().time()
        backstop_at = waited_from + self._backstop(cmd)  # from the submission, however long that took
        fut: asyncio.Future[Handed] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = fut
        try:
            refused = await self.submit("http", cmd, subjects.edge_reply(self.replica, request_id), request_id)
            if refused is not None and not fut.done():  # done: it was stored after all, and answered
                self._count("http", cmd, None, refused, started)
                return Called(refused)
            try:
                left = max(0.0, backstop_at - asyncio.get_running_loop().time())
                reply, team, model_s = await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                reply, team, model_s = (await self._after_outage(fut, waited_from)
                                        or Handed(decider.timeout_reply(request_id), None))
            if fut.done():
                self._answered(request_id)
        except asyncio.CancelledError:  # cut off (the replica's end): a reply already here reached nobody
            if fut.done() and not fut.cancelled():
                gone = fut.result()
                await self._record(decider.handed_over(gone.reply, gone.team, "gone", bus.now_utc(), self.version))
            raise
        finally:  # from here on a reply for this request finds no caller (`_on_reply`)
            self.pending.pop(request_id, None)
        await self._record(decider.handed_over(reply, team, "waiting", bus.now_utc(), self.version))
        added = self._count("http", cmd, team, reply, started, model_s)
        return Called(reply, None if added is None else added * 1000)

    async def stream(self, cmd: SubmitRequest) -> AsyncGenerator[StreamChunk | SubmitReply, None]:
        """The HTTP path of `stream: true`: the answer's chunks as the model produces them, then the
        reply (the authority on content and usage). Closed early (the caller hung up), the reply is
        recorded as undelivered when it comes."""
        request_id, started = uuid.uuid4().hex, time.monotonic()
        logs.request_id.set(request_id)
        loop = asyncio.get_running_loop()
        waited_from = loop.time()
        deadline = waited_from + self._backstop(cmd)
        fut: asyncio.Future[Handed] = loop.create_future()
        queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
        self.pending[request_id], self.streams[request_id] = fut, queue
        outcome: Handed | None = None
        streamed_out = False
        getter: asyncio.Future[StreamChunk] | None = None
        try:
            refused = await self.submit("http", cmd, subjects.edge_reply(self.replica, request_id), request_id)
            if refused is not None and not fut.done():  # done: it was stored after all, and answered
                streamed_out = True
                self._count("http", cmd, None, refused, started)
                yield refused
                return
            while outcome is None:
                getter = asyncio.ensure_future(queue.get())
                waiters: set[asyncio.Future[Any]] = {getter, fut}
                done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                if fut in done:
                    outcome = fut.result()
                    self._answered(request_id)
                    while not queue.empty():  # tokens that came before the reply go first
                        yield queue.get_nowait()
                else:
                    late = await self._after_outage(fut, waited_from)
                    outcome = late or Handed(decider.timeout_reply(request_id), None)
                    if late is not None:
                        self._answered(request_id)
                        while not queue.empty():
                            yield queue.get_nowait()
            streamed_out = True
        finally:
            if getter is not None:
                getter.cancel()
            self.pending.pop(request_id, None)
            self.streams.pop(request_id, None)
            if not streamed_out:  # hung up: a reply already here is recorded now, a later one on arrival
                if outcome is None and fut.done() and not fut.cancelled():
                    outcome = fut.result()
                if outcome is not None:
                    await self._record(decider.handed_over(outcome.reply, outcome.team, "gone", bus.now_utc(),
                                                           self.version))
        await self._record(decider.handed_over(outcome.reply, outcome.team, "waiting", bus.now_utc(), self.version))
        self._count("http", cmd, outcome.team, outcome.reply, started, outcome.model_s)
        yield outcome.reply

    async def watch_bus(self, stop: asyncio.Event) -> None:
        """Note when JetStream last failed to answer (disconnected, or a broker that hangs without
        closing the connection): the edge's 504 must not be a guess made during an outage.

        It asks for its own durable's info, a request whose late answer is dropped. Not a PING
        (`nc.flush`): nats-py's read loop dies on the PONG of a flush that timed out, which a frozen
        broker causes (found by this very watch in a fault test).
        """
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            now = loop.time()
            if now - self.watched_at > WATCH_GAP_S:  # this process itself stood still (paused, starved)
                self.unhealthy_at = now
            self.watched_at = now
            try:
                if not self.nc.is_connected:
                    raise ConnectionError
                await self.js.consumer_info(subjects.STREAM, "edge", timeout=1.0)
            except Exception:
                self.unhealthy_at = loop.time()
            self.watched_at = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def _bus_unsteady_since(self, started: float) -> bool:
        """Whether the bus failed, or this process stood still, since `started` (or lately): then
        what the pipeline decided may still be on its way, and a 504 would be a guess. A pause is
        seen by the watch falling behind: a review froze the edge itself, and its 504 was charged."""
        loop_now = asyncio.get_running_loop().time()
        stalled = loop_now - self.watched_at > WATCH_GAP_S
        return stalled or self.unhealthy_at >= started - 1.0 or loop_now - self.unhealthy_at < OUTAGE_SETTLE_S

    async def _after_outage(self, fut: asyncio.Future[Handed], started: float) -> Handed | None:
        """The pipeline's answer after the backstop, when the bus was away during the request.

        A stage that decided before the deadline may have had its fact buffered (nats-py, or a
        frozen broker's socket) and stored only after the bus came back; a 504 guessed meanwhile
        told a caller "failed" for a request then settled and charged (a hostile review did it with
        broker kills and SIGSTOP). So after an outage the edge waits for what the pipeline decides
        (the answer, or the budget's deadline end, which charges nothing) until the bus has been
        steady OUTAGE_SETTLE_S, at most OUTAGE_WAIT_S; None when there was no outage or nothing came.
        """
        loop = asyncio.get_running_loop()
        if not self._bus_unsteady_since(started):
            return None
        until = loop.time() + OUTAGE_WAIT_S
        while loop.time() < until and loop.time() - self.unhealthy_at < OUTAGE_SETTLE_S:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 1.0)
            except TimeoutError:
                continue
        return None

    def _backstop(self, cmd: SubmitRequest) -> float:
        """How long this replica waits for the reply: the request's deadline, which every stage
        enforces and whose outcome it answers (an attempt cut at it, what a stream got), plus a
        moment for that answer to arrive; the edge's own 504 is for a pipeline that says nothing."""
        return decider.caller_wait_s(cmd, self.settings.request_timeout_s) + REPLY_GRACE_S

    async def readiness(self) -> dict[str, bool]:
        """Whether each stage consumes: its durable has a pull request waiting (an idle consumer
        always has one; a busy one between fetches may not, so a stage gets three looks). The
        invokers: the endpoints this deployment hosts, else any endpoint of the catalog."""
        now = time.monotonic()
        if now - self.ready[0] < READY_MEMORY_S:
            return self.ready[1]
        if not self.nc.is_connected:
            seen = {"bus": False}
        else:
            wanted = {name: [name] for name in registry.durables()}
            if self.settings.endpoints:  # every endpoint this deployment hosts, each by name
                wanted |= {d: [d] for d in (registry.invoker_durable(e)[0] for e in sorted(self.settings.endpoints))}
            else:  # an edge-only node: some invoker somewhere
                named = sorted(catalog.all_endpoints(self.session.policy.bundle.catalog))
                wanted["invoker"] = [registry.invoker_durable(e)[0] for e in named]
            seen = {stage: False for stage in wanted}
            for look in range(3):
                for stage, names in wanted.items():
                    if not seen[stage]:
                        seen[stage] = await self._pulled(names)
                if all(seen.values()):
                    break
                await asyncio.sleep(0.2 * (look + 1))
            seen = {"bus": True, **seen}
        self.ready = (time.monotonic(), seen)
        return seen

    async def _pulled(self, durables: list[str]) -> bool:
        for name in durables:
            info = await self._durable(name)
            if info is not None and int(info.num_waiting or 0) > 0:
                return True
        return False

    async def _durable(self, name: str) -> ConsumerInfo | None:
        """A durable's info, by name (the edge may read a durable's info, not list them); None when
        the broker does not answer within a second."""
        try:
            info: ConsumerInfo = await self.js.consumer_info(subjects.STREAM, name, timeout=1.0)
        except (NotFoundError, TimeoutError, nats.errors.Error):
            return None
        return info

    def _count(self, entry: str, cmd: SubmitRequest, team: str | None, reply: SubmitReply,
               started: float | None, model_s: float | None = None) -> float | None:
        """Count an answer; returns the seconds the gateway added to it (None: no model answered)."""
        if reply.error is not None:  # an operator's trail of refusals (the line names the request, never its text)
            log.info("answered %s: %s", entry, reply.error.code)
        bundle = self.session.policy.bundle
        seconds = None if started is None else time.monotonic() - started
        models = [m.id for m in bundle.catalog.model]
        self.metrics.answered(entry, cmd.chat.model, models, team, bundle.budgets.teams, reply, seconds)
        if seconds is not None and model_s is not None and reply.completion is not None:
            return self.metrics.added_time(cmd.chat.model, models, seconds, model_s)
        return None

    async def scrape(self) -> bytes:
        """GET /metrics: the counters, and the consumers' backlog and restarts as of now."""
        self.metrics.connected.set(1 if self.nc.is_connected else 0)
        if self.nc.is_connected:
            names = list(registry.durables(catalog.all_endpoints(self.session.policy.bundle.catalog)))
            infos = await asyncio.gather(*(self._durable(name) for name in names))
            self.metrics.consumers([(name, int(info.num_pending or 0), int(info.num_ack_pending or 0),
                                     int(info.num_redelivered or 0))
                                    for name, info in zip(names, infos, strict=True) if info is not None])
            if time.monotonic() - self.looked_at >= SCRAPE_MEMORY_S:  # an unauthenticated probe cannot
                self.looked_at = time.monotonic()  # make the edge ask the broker more than this often
                budgets, circuits = await asyncio.gather(self._budgets(), self._circuits())
                self.metrics.budgets(budgets)
                self.metrics.circuits(circuits)
        self.metrics.supervised(Path(self.settings.data_dir) / "supervisor.json")
        return self.metrics.exposition()

    async def _budgets(self) -> list[tuple[str, int, int, int]]:
        """Each policy team's newest ledger fact: its totals, or zero spent and reserved when that
        fact is of an earlier period or there is none."""
        now, teams = bus.now_utc(), sorted(self.session.policy.bundle.budgets.teams.items())
        facts = await asyncio.gather(*(self._newest(subjects.ledger_filter(team)) for team, _ in teams))
        rows = []
        for (team, budget), fact in zip(teams, facts, strict=True):
            if isinstance(fact, LedgerTotals) and fact.period == period_of(budget.period, now):
                rows.append((team, fact.spent_micros, fact.reserved_micros, budget.cap_micros))
            else:
                rows.append((team, 0, 0, budget.cap_micros))
        return rows

    async def _circuits(self) -> list[tuple[str, str, bool]]:
        """Per catalog model, its endpoints and whether the router's newest route for the model
        passed each over as failing; none routed yet: all closed."""
        models = self.session.policy.bundle.catalog.model
        routes = await asyncio.gather(*(self._newest(subjects.routes_of(m.id)) for m in models))
        rows = []
        for model, route in zip(models, routes, strict=True):
            opened = set(route.circuit_open) if isinstance(route, RouteSelected) else set()
            rows += [(model.id, e, e in opened) for e in catalog.endpoints_of(model)]
        return rows

    async def _newest(self, subject: str) -> AnyEvent | None:
        """The newest event on `subject` (a direct get of that one message), or None: none, junk,
        unsigned, or no answer within a second (a scrape must answer while the broker does not)."""
        try:
            newest = await asyncio.wait_for(self.js.get_last_msg(subjects.STREAM, subject, direct=True), 1.0)
            bus.owner_of(self.js, newest.subject or "", newest.headers, newest.data or b"")
            return codec.decode_event(newest.data or b"", newest.subject or "")
        except (NotFoundError, TimeoutError, nats.errors.Error, codec.DecodeError):
            return None

    def _answered(self, request_id: str) -> None:
        self.answered[request_id] = None
        if len(self.answered) > ANSWERED_MEMORY:
            del self.answered[next(iter(self.answered))]

    async def _on_chunk(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        queue = self.streams.get(request_id)
        if queue is None:
            return  # not streaming here (any more): the reply carries the whole answer
        try:
            chunk = codec.decode_chunk(msg.data)
        except codec.DecodeError as exc:  # only invokers may publish here: a bug, not input
            log.error("undecodable chunk on %s: %s", msg.subject, exc)
            return
        if chunk.request_id == request_id:
            queue.put_nowait(chunk)

    async def _record(self, facts: list[AnyEvent]) -> None:
        # No redelivery stands behind a caller's outcome: log a failed write loudly, still answer.
        for fact in facts:
            try:
                await bus.publish(self.js, fact)
            except Exception as exc:
                log.error("could not record %s for %s: %r", type(fact).__name__, fact.request_id, exc)

    @property
    def version(self) -> str:
        """The active policy version, recorded on every fact the edge publishes."""
        return self.session.policy_version

    def models_for(self, token: str) -> list[str] | TokenDefect:
        """What GET /v1/models shows this session: only models its team or roles may use."""
        return visible_models(token, self.session.policy, bus.now_utc())

    async def _on_reply(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        if msg.subject != subjects.edge_reply(self.replica, request_id):
            # a JetStream delivery pushed at our inbox keeps its stored subject: never a reply
            log.error("ignored a message delivered to this replica's inbox from %s", msg.subject)
            return
        try:
            reply = codec.decode_reply(msg.data)
        except codec.DecodeError as exc:  # only edge replicas may publish here: a bug, not input
            log.error("undecodable reply on %s: %s", msg.subject, exc)
            return
        team = (msg.headers or {}).get(decider.TEAM_HEADER)
        fut = self.pending.get(request_id)
        if fut is not None and not fut.done():
            model_s = None
            with contextlib.suppress(ValueError, TypeError):
                model_s = float((msg.headers or {}).get(decider.MODEL_MS_HEADER, "")) / 1000
            fut.set_result(Handed(reply, team, model_s))
            return
        caller: decider.HolderView = "answered" if request_id in self.answered else "gone"
        await self._record(decider.handed_over(reply, team, caller, bus.now_utc(), self.version))

    async def _on_submit(self, msg: Msg) -> None:
        """Hand each `gw.submit` message to a task of its own: nats-py runs a subscription's callbacks
        one at a time, so one submission waiting out an outage (up to its deadline and 120 s more)
        held up every batch caller behind it (a review). At most MAX_SUBMITTING run at once; past
        that the callback waits, and the subscription's pending limits push back as before."""
        await self.submitting.acquire()
        task = asyncio.create_task(self._submit_one(msg))
        self.submissions.add(task)
        task.add_done_callback(self._submitted)

    def _submitted(self, task: asyncio.Task[None]) -> None:
        self.submissions.discard(task)
        self.submitting.release()

    async def _submit_one(self, msg: Msg) -> None:
        request_id = uuid.uuid4().hex
        try:
            refused = decider.refuse_reply_subject(msg.subject, msg.reply)
            if refused is not None:  # recorded, never answered, never run
                log.warning("gw.submit refused: %s", refused)
                fact = decider.rejected(request_id, msg.subject, "reply_subject_refused", refused, bus.now_utc(),
                                        self.version)
                await bus.publish(self.js, fact)  # no reply goes out, so no delivery is recorded
                return
            if len(msg.data) > self.settings.max_body_bytes:
                await self.reject(
                    request_id,
                    msg.subject,
                    "body_too_large",
                    f"{len(msg.data)} bytes > {self.settings.max_body_bytes}",
                    msg.reply,
                )
                return
            try:
                cmd = codec.decode_submit(msg.data)
                decider.validate_chat(cmd.chat)
            except codec.DecodeError as exc:
                await self.reject(request_id, msg.subject, "invalid_request", str(exc), msg.reply)
                return
            not_recorded = await self.submit("nats", cmd, msg.reply or "", request_id)
            if not_recorded is not None and msg.reply:
                await self.nc.publish(msg.reply, codec.encode(not_recorded))
        except Exception as exc:  # the caller must hear something; the bus may be down
            log.error("gw.submit failed: %s", type(exc).__name__)  # never the message: it may quote the prompt
            if msg.reply and decider.refuse_reply_subject(msg.subject, msg.reply) is None:
                reply = decider.error_reply(request_id, "request_failed", f"could not submit: {type(exc).__name__}")
                await self.nc.publish(msg.reply, codec.encode(reply))

    async def respond(self, msg: Msg) -> None:
        """Responder stage: turn a terminal event into the caller's reply; never publish it elsewhere."""
        event = codec.decode_event(msg.data, msg.subject)
        if not isinstance(event, decider.Terminal):
            raise codec.DecodeError(f"edge responder does not take {type(event).__name__}")
        if event.request_id in self.state.recorded or not decider.ends_request(event):
            return  # answered and recorded already (a redelivery answers nobody twice), or routed again
        target = decider.reply_target(event.reply_to)
        if target is not None:  # an HTTP caller's reply is forwarded to the replica holding it
            await self.nc.publish(target, codec.encode(decider.reply_for(event)), headers=decider.reply_headers(event))
        for fact in decider.decide(event, self.state, self.version, bus.now_utc()):
            async def record(fact: AnyEvent = fact) -> None:
                await bus.publish(self.js, bus.caused(fact, event, msg))
            await bus.outlasting_outages(record, msg, "edge", self.stop)  # the caller has its reply: record it
            self.state = decider.evolve(self.state, fact)
            if decider.reply_route(event.reply_to) == "application":  # an HTTP caller is counted where it waits
                bundle = self.session.policy.bundle
                self.metrics.answered("nats", str(getattr(event, "model", "")), (m.id for m in bundle.catalog.model),
                                      decider.team_of(event), bundle.budgets.teams, decider.reply_for(event))


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve HTTP, `gw.submit` and the responder until `stop` is set."""
    async with worker.session(settings, "edge", policy_view.for_worker(settings)) as s:
        # Told to stop, the replica takes no new caller, but its responder goes on until every caller
        # it holds has had its answer: the pipeline's word, or a 504 at a deadline the pipeline also
        # honours. Stopped first, it left callers waiting whose answer it could no longer receive; at
        # their deadline they heard 504 about requests that were answered and charged (found by the
        # cluster fault test that restarts the whole gateway during traffic). Until then it also
        # records deliveries through outages, as ever: a record given up is a reply sent twice.
        callers_answered = asyncio.Event()
        edge = Edge(settings, s, callers_answered)
        await edge.start()
        def refused(code: str, detail: str) -> Awaitable[SubmitReply]:  # bytes aiohttp's parser refused
            return edge.reject(uuid.uuid4().hex, unparsed.SUBJECT, code, detail, None)

        runner = unparsed.OpenAIShapedRunner(http_app.build(edge), refused, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("edge listening on http://%s:%d", settings.http_host, settings.http_port)
        watching = asyncio.create_task(edge.watch_bus(callers_answered))  # the waiting callers rely on it

        async def close_http() -> None:
            await stop.wait()
            try:
                await edge.stop_taking()
                await runner.cleanup()  # stops listening, then waits for the handlers in flight
            except Exception as exc:  # the responder must stop all the same
                log.error("edge: closing HTTP failed: %s", type(exc).__name__)
            finally:
                callers_answered.set()

        closing = asyncio.create_task(close_http())
        try:
            await bus.consume(edge.js, "edge", edge.respond, callers_answered)
        finally:
            if not closing.done():  # the responder ended on its own: the replica ends with it
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
                await runner.cleanup()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
