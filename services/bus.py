"""Bus plumbing every shell shares: the stream and consumers, publishing, and the pull loop.

Error tree of a message's handling (STYLE §5):

    Exception
     ├── codec.DecodeError     bad bytes: MessageRejected is published, the message is acked
     └── anything else         infrastructure or a bug: nak with backoff; after MAX_DELIVER
                               attempts a terminal RequestFailed goes out and it is acked

Nothing is dropped silently and no message stops a worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..schemas import codec, subjects
from ..schemas.events import AnyEvent, BudgetReserved, MessageRejected, RequestFailed, Reservation, envelope
from . import fact_signatures, logs
from .credentials import load_creds
from .registry import INVOKER_ACK_WAIT_S, ConsumerSpec, by_name, durables, invoker_durable
from .settings import WorkerSettings

log = logging.getLogger("enclave_gateway.bus")

SHORT_READ_IDLE_S = 1.0  # a finished read's consumer is gone a second after it (see own_reader)
MAX_DELIVER = 5
OUTAGE_SAY_EVERY_S = 30.0
BACKOFF_S = (0.2, 1.0, 3.0, 6.0)
# Every durable consumer comes from the one registry of identities (services/registry.py).
CONSUMERS: dict[str, ConsumerSpec] = durables()
# A fact decided again from a redelivered message keeps its id, and the stream drops the copy only
# within this window: so it outlasts the last redelivery of the slowest consumer. At 120 s, routes
# redelivered at the invoker's 180 s ack wait stored a second, contradicting outcome (a review found
# 16 after a broker kill, which replay then named).
DUPLICATE_WINDOW_S = (max(INVOKER_ACK_WAIT_S, *(s.ack_wait_s for s in CONSUMERS.values())) * MAX_DELIVER
                      + sum(BACKOFF_S) + 60.0)


# What each connection signs its facts with, and checks others' facts against (fact_signatures).
# Kept per connection, not per process: the tests run every worker in one process, each as itself.
_signers: weakref.WeakKeyDictionary[Client, fact_signatures.FactSigner] = weakref.WeakKeyDictionary()
_pins: weakref.WeakKeyDictionary[Client, fact_signatures.Pins] = weakref.WeakKeyDictionary()
# Facts refused for want of their owner's signature, by the stage that refused them (each is also
# a MessageRejected fact with reason `unsigned_fact`, so the record counts them too).
UNSIGNED_REFUSED: collections.Counter[str] = collections.Counter()


def _client(js: JetStreamContext) -> Client:
    nc: Client = js._nc
    return nc


def signer_of(js: JetStreamContext) -> fact_signatures.FactSigner | None:
    """The signing key of the identity `js` is connected as (None: a deployment without identities)."""
    return _signers.get(_client(js))


def pins_of(js: JetStreamContext) -> fact_signatures.Pins | None:
    """The pinned fact signers (None: a deployment without identities, where nothing is signed)."""
    return _pins.get(_client(js))


def owner_of(js: JetStreamContext, subject: str, headers: dict[str, str] | None, data: bytes) -> str | None:
    """The identity that signed this stored fact as its owner (None when nothing is signed here);
    raises `fact_signatures.UnsignedFact` (a DecodeError) for a fact no owner signed."""
    pins = pins_of(js)
    return None if pins is None else pins.owner(subject, headers, data)


def unsigned(js: JetStreamContext, subject: str, headers: dict[str, str] | None, data: bytes
             ) -> fact_signatures.UnsignedFact | None:
    """Why no owner's signature makes this stored message a fact, or None when one does."""
    try:
        owner_of(js, subject, headers, data)
    except fact_signatures.UnsignedFact as exc:
        return exc
    return None


def signed_only(js: JetStreamContext, stored: list[tuple[bytes, str, int, dict[str, str] | None]], reader: str
                ) -> list[tuple[bytes, str, int]]:
    """The stored facts whose owner signed them; each refused one is logged, never acted on."""
    out: list[tuple[bytes, str, int]] = []
    for data, subject, seq, headers in stored:
        if (why := unsigned(js, subject, headers, data)) is not None:
            log.warning("%s: ignored seq %d: %s", reader, seq, why)
            continue
        out.append((data, subject, seq))
    return out


def _remember_keys(nc: Client, settings: WorkerSettings, name: str) -> Client:
    pins = fact_signatures.load_pins(settings.creds_dir)
    if pins is None and load_creds(settings.creds_dir, name) is not None:
        # an identity with no pins would sign nothing and accept anything: fail closed instead
        raise fact_signatures.MissingPins(f"{fact_signatures.pins_path(Path(settings.creds_dir))} is missing: "
                                          "every fact is checked against it (`gateway up` writes it)")
    if pins is not None:
        _pins[nc] = pins
        signer = fact_signatures.load_signer(settings.creds_dir, name)
        if signer is not None:
            _signers[nc] = signer
    return nc


def now_utc() -> datetime:
    """The shells' clock; deciders receive it as an argument."""
    return datetime.now(UTC)


async def connect(settings: WorkerSettings, name: str, *, keep_trying: bool = True) -> Client:
    """Connect as identity `name`: its own NKey and inbox prefix when credentials exist.

    Workers keep trying through a broker restart; a CLI call (`keep_trying=False`) fails at once
    with one clear error instead of retrying forever.
    The per-user inbox prefix matters: with a shared `_INBOX.>` any user could read every other
    user's JetStream deliveries (measured on nats-server 2.15).
    """
    servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]  # a cluster: every seed URL
    creds = load_creds(settings.creds_dir, name)
    auth: dict[str, str] = {}
    if creds is not None:  # NKey challenge-response: the seed signs the server's nonce, nothing secret is sent
        auth = {"nkeys_seed": creds.seed_file, "inbox_prefix": creds.inbox_prefix}
    secure: dict[str, object] = {}
    if settings.nats_ca_file:  # the server proves itself first: TLS before it says anything
        secure = {"tls": ssl.create_default_context(cafile=settings.nats_ca_file), "tls_handshake_first": True}
    if keep_trying:
        watch = OutageLog(name)
        watch.nc = await nats.connect(
            servers, name=f"gw-{name}", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=watch.error, disconnected_cb=watch.lost, reconnected_cb=watch.back, **auth, **secure
        )
        return _remember_keys(watch.nc, settings, name)

    async def quiet(_exc: Exception) -> None:
        return None

    return _remember_keys(await nats.connect(
        servers,
        name=f"gw-{name}",
        allow_reconnect=False,
        connect_timeout=2,
        max_reconnect_attempts=1,  # 0 would retry the first connect forever (nats-py)
        error_cb=quiet,
        **auth,
        **secure,
    ), settings, name)


class OutageLog:
    """What a worker says about its bus: once when it is lost, once when it is back, and at most one
    line per OUTAGE_SAY_EVERY_S while it stays away (nats-py's default logs a traceback per retry,
    which filled a worker's log with 730 KB in a broker outage)."""

    def __init__(self, name: str) -> None:
        self.name, self.since, self.said, self.errors = name, 0.0, 0.0, 0
        self.nc: Client | None = None

    async def error(self, exc: Exception) -> None:
        self.errors += 1
        now = asyncio.get_running_loop().time()
        if now - self.said >= OUTAGE_SAY_EVERY_S:
            self.said = now
            log.warning("%s: bus error (%d so far): %s", self.name, self.errors, type(exc).__name__)

    async def lost(self) -> None:
        if self.nc is None or self.nc.is_closed or self.nc.is_draining:
            return  # closed on purpose: nothing was lost
        self.since = self.said = asyncio.get_running_loop().time()
        log.warning("%s: lost the bus; reconnecting", self.name)

    async def back(self) -> None:
        away = asyncio.get_running_loop().time() - self.since
        log.warning("%s: bus back after %.1f s (%d errors meanwhile)", self.name, away, self.errors)
        self.errors = 0


async def close(nc: Client) -> None:
    """Drain (flush what was published, finish callbacks); close outright if that hangs."""
    try:
        await asyncio.wait_for(nc.drain(), 5.0)
    except (TimeoutError, nats.errors.Error):
        try:
            await nc.close()
        except Exception as exc:  # nats-py fails closing a TLS transport already gone: we are leaving anyway
            log.debug("closing the connection: %r", exc)


RATE_COUNTERS_KEPT_S = 300.0  # a minute's counter is read for that minute only


async def js_ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to `config`."""
    try:
        await js.stream_info(str(config.name))
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)


async def ensure_rate_counters(js: JetStreamContext) -> None:
    """The stream of rate-limit counters (services/budget/rates.py), as replicated as the
    audit stream: JetStream counters, one subject per limit and minute; derived data, never the
    audit trail (each request's counts are recorded in its budget decision). Only the newest value
    of a counter is kept, and only a few minutes. Made when a policy with rate limits is activated:
    a deployment without limits runs no such stream (one consensus group less on every node)."""
    replicas = (await js.stream_info(subjects.STREAM)).config.num_replicas or 1
    await js_ensure_stream(js, StreamConfig(
        name=subjects.RATES_STREAM,
        num_replicas=replicas,
        subjects=[subjects.ALL_RATES],
        storage=StorageType.FILE,
        allow_msg_counter=True,
        allow_direct=True,
        max_msgs_per_subject=1,
        max_age=RATE_COUNTERS_KEPT_S,
        discard=DiscardPolicy.OLD,
    ))


async def ensure_topology(js: JetStreamContext, replicas: int = 1, endpoints: Iterable[str] = ()) -> None:
    """Create or update the stream GW_EVENTS (R`replicas`), every service's durable consumer and
    the durable of each endpoint's invokers."""
    config = StreamConfig(
        name=subjects.STREAM,
        num_replicas=replicas,
        subjects=[subjects.ALL_EVENTS],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        duplicate_window=DUPLICATE_WINDOW_S,
        # the audit trail never makes room by dropping its oldest facts: a stream given a size
        # limit refuses new writes when full, and the edge then answers 503 (AU-5)
        discard=DiscardPolicy.NEW,
    )
    await js_ensure_stream(js, config)
    for name, spec in CONSUMERS.items():
        await js.add_consumer(subjects.STREAM, consumer_config(name, spec))
    await ensure_endpoints(js, endpoints)
    # Budget projection snapshots: derived data, never the audit trail (services/budget/ledger_store.py).
    await js.create_object_store("GW_BUDGET", config=ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas))


async def ensure_endpoints(js: JetStreamContext, endpoints: Iterable[str]) -> None:
    """The durable of each endpoint's invokers (a catalog activation may name new endpoints), and
    no more the one durable all invokers shared once, which took every route."""
    for endpoint in endpoints:
        name, spec = invoker_durable(endpoint)
        config = consumer_config(name, spec)
        try:  # one made by anyone else (squatted before the name was protected) is replaced
            info = await js.consumer_info(subjects.STREAM, name)
            if (info.config.filter_subject, info.config.deliver_subject, info.config.ack_policy) != (
                    config.filter_subject, None, AckPolicy.EXPLICIT):
                log.warning("replacing consumer %s, not the endpoint's durable: %s", name, info.config)
                await js.delete_consumer(subjects.STREAM, name)
        except NotFoundError:
            pass
        await js.add_consumer(subjects.STREAM, config)
    try:
        await js.delete_consumer(subjects.STREAM, "invoker")
        log.info("deleted the shared invoker durable: each endpoint's invokers have their own")
    except NotFoundError:
        pass


async def own_reader(js: JetStreamContext, subject: str, reader: str, start: int,
                     start_time: datetime | None = None, idle_s: float = 5.0) -> JetStreamContext.PushSubscription:
    """An ordered consumer of the reader's own over `subject`, from stream sequence `start`.

    Named and filtered to exactly that subject, which is what the registry grants (the bare create
    form would let a credential create or update any consumer). nats-py never deletes it and no
    runtime role may: the server drops it once it has had no subscriber for `idle_s`. Until then
    it counts against the stream's consumer limit (1,000 by default since nats-server 2.15), so a
    short read asks for a short `idle_s`.
    """
    config = (ConsumerConfig(name=f"{reader}_{uuid.uuid4().hex}", inactive_threshold=idle_s,
                             deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start_time)
              if start_time is not None else
              ConsumerConfig(name=f"{reader}_{uuid.uuid4().hex}", inactive_threshold=idle_s,
                             deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)))
    sub = await js.subscribe(subject, stream=subjects.STREAM, ordered_consumer=True, config=config)
    # nats-py re-creates an ordered consumer (after a reconnect or a gap) from this very config,
    # switched to BY_START_SEQUENCE but with the start time kept, which the server refuses for
    # good: after one broker restart the router's readers were gone (a hostile review found it).
    config.opt_start_time = None
    return sub


async def stored_between(js: JetStreamContext, subject: str, reader: str, start: int, until: int
                         ) -> AsyncGenerator[Msg, None]:
    """The messages stored on `subject` from sequence `start` through `until`, in order."""
    if until < start:
        return
    sub = await own_reader(js, subject, reader, start, idle_s=SHORT_READ_IDLE_S)
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            yield msg
            if msg.metadata.sequence.stream >= until:
                return
    finally:
        await sub.unsubscribe()


async def stored_on(js: JetStreamContext, subject: str, reader: str) -> list[tuple[bytes, str, int]]:
    """Every fact stored on `subject` so far that its owner signed, as (data, subject, stream
    sequence), oldest first; what no owner signed is logged and left out."""
    return signed_only(js, await stored_with_headers(js, subject, reader), reader)


async def stored_with_headers(js: JetStreamContext, subject: str, reader: str
                              ) -> list[tuple[bytes, str, int, dict[str, str] | None]]:
    """Every message stored on `subject` so far, signed or not, with its headers, oldest first."""
    try:
        last = await js.get_last_msg(subjects.STREAM, subject, direct=True)
    except NotFoundError:
        return []
    async with contextlib.aclosing(stored_between(js, subject, reader, 1, int(last.seq or 0))) as msgs:
        return [(msg.data, msg.subject, msg.metadata.sequence.stream, msg.headers) async for msg in msgs]


def consumer_config(name: str, spec: ConsumerSpec) -> ConsumerConfig:
    """The JetStream config of a service's consumer."""
    one = len(spec.filters) == 1
    return ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=MAX_DELIVER,
        ack_wait=spec.ack_wait_s,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=spec.filters[0] if one else None,
        filter_subjects=None if one else list(spec.filters),
    )


async def publish_ack(js: JetStreamContext, event: AnyEvent, headers: dict[str, str] | None = None,
                      wait_s: float | None = None) -> PubAck:
    """Publish an event signed by this connection's identity, under a message id only that
    identity computes: a republish of the same decision is deduplicated by the server."""
    subject, data = subjects.for_event(event), codec.encode(event)
    signer = signer_of(js)
    hdrs = (signer.headers(subject, signer.msg_id(event.event_id), data) if signer is not None
            else {"Nats-Msg-Id": event.event_id})
    return await js.publish(subject, data, timeout=wait_s, headers={**hdrs, **(headers or {})})


async def publish(js: JetStreamContext, event: AnyEvent, headers: dict[str, str] | None = None) -> int:
    """Publish an event (see `publish_ack`); returns its stream sequence."""
    return int((await publish_ack(js, event, headers)).seq)


def caused(event: AnyEvent, cause: AnyEvent, msg: Msg) -> AnyEvent:
    """`event` stamped with the input it was decided from: that input's id and stream sequence."""
    return msgspec.structs.replace(event, causation_id=cause.event_id, causation_seq=msg.metadata.sequence.stream)


Handler = Callable[[Msg], Awaitable[None]]


async def consume(
    js: JetStreamContext, stage: str, handle: Handler, stop: asyncio.Event, *, batch: int = 64, sequential: bool = False
) -> None:
    """Fetch from the stage's durable consumer until `stop` is set, applying the error policy.

    `sequential`: one message at a time, in order (the budget). Otherwise up to `batch` messages
    are handled at once and each freed slot is refilled by the next fetch, so one slow message (a
    model call) never holds up the others, fetched with it or after it.
    """
    psub = await js.pull_subscribe_bind(stage, stream=subjects.STREAM)
    log.info("%s consuming", stage)
    in_flight: set[asyncio.Task[None]] = set()
    try:
        while not stop.is_set():
            free = 1 if sequential else batch - len(in_flight)
            if free <= 0:
                await asyncio.wait(in_flight, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await psub.fetch(batch if sequential else free, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:  # the bus is away: its OutageLog says so, the fetch is retried
                log.debug("%s: fetch failed: %r", stage, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                if sequential:
                    await process(js, stage, handle, msg)
                else:
                    task = asyncio.create_task(process(js, stage, handle, msg))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
    finally:
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
    await psub.unsubscribe()


async def process(js: JetStreamContext, stage: str, handle: Handler, msg: Msg) -> None:
    """Handle one message; never raises. Its log lines carry the request it belongs to."""
    token = logs.request_id.set(logs.request_of_msg_id((msg.headers or {}).get("Nats-Msg-Id")))
    try:
        await _process(js, stage, handle, msg)
    finally:
        logs.request_id.reset(token)


async def _process(js: JetStreamContext, stage: str, handle: Handler, msg: Msg) -> None:
    try:
        owner_of(js, msg.subject, msg.headers, msg.data)  # before any byte of it is decoded
        await handle(msg)
        await msg.ack()
    except fact_signatures.UnsignedFact as exc:
        await _reject(js, stage, msg, str(exc), "unsigned_fact")
    except codec.DecodeError as exc:
        await _reject(js, stage, msg, str(exc))
    except Exception as exc:  # infrastructure or a bug: retry, then fail the request loudly
        delivered = msg.metadata.num_delivered
        log.warning("%s: attempt %d on %s failed: %s", stage, delivered, msg.subject, str(exc) or repr(exc))
        if delivered >= MAX_DELIVER:
            await _fail(js, stage, msg, exc)
        else:
            await _safe(msg.nak(delay=BACKOFF_S[min(delivered, len(BACKOFF_S)) - 1]))


# A compare-and-set refused: the expected last sequence was not the stream's. A single server says
# 10071 ("wrong last sequence: N"); a clustered stream's leader says 10164 ("wrong last sequence"),
# which, unrecognised, made a budget conflict on the cluster look like a failure.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})

# The stream did not take a write because it could not (no leader, no quorum, away, temporarily
# unavailable): never because of the write itself (too large, refused), which retrying cannot mend.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    TimeoutError, NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError)
# Not a closed connection: nats-py does not reopen it (the server closes one for a protocol
# violation), so the worker must exit and be restarted rather than wait for it.
RECORD_RETRY_MAX_S = 2.0  # and so the in-progress signal: well within any ack wait (the shortest is 30 s)


async def outlasting_outages(write: Callable[[], Awaitable[None]], msg: Msg, stage: str, stop: asyncio.Event) -> None:
    """Run `write` until the stream takes it, however long the bus stays unable to: for the record
    of something already true (the model ran and its caller has the answer), where giving up after
    MAX_DELIVER attempts turned a leader election into `RequestFailed`, a released reservation and
    a caller served free. The message is kept in progress meanwhile so it is not redelivered
    elsewhere; only a stop, or an error that is no outage ends it early, to the
    usual bounded retries: a write that can never succeed must not hold a consumer's slot forever."""
    delay = BACKOFF_S[0]
    while True:
        try:
            await write()
            return
        except OUTAGE_ERRORS as exc:
            if stop.is_set():
                raise
            log.warning("%s: the stream did not take the record of %s: %s; retrying", stage, msg.subject,
                        str(exc) or type(exc).__name__)
        await _safe(msg.in_progress())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(RECORD_RETRY_MAX_S, delay * 2)


async def _reject(js: JetStreamContext, stage: str, msg: Msg, detail: str, reason: str = "invalid_event") -> None:
    seq = msg.metadata.sequence.stream
    if reason == "unsigned_fact":
        UNSIGNED_REFUSED[stage] += 1
    event = MessageRejected(
        **envelope(f"seq-{seq}", f"rejected-by-{stage}", now_utc(), "n/a"),
        subject=msg.subject,
        stream_seq=seq,
        stage=stage,
        reason=reason,
        detail=detail[:1000],
    )
    log.warning("%s: rejected %s seq %d: %s", stage, msg.subject, seq, detail)
    if await _safe(publish(js, event)):
        await _safe(msg.ack())


async def _fail(js: JetStreamContext, stage: str, msg: Msg, exc: Exception) -> None:
    if stage in CONSUMERS and not by_name(stage).fails_requests:
        await _reject(js, stage, msg, f"gave up after {MAX_DELIVER} attempts: {exc!r}")
        return
    try:
        original = codec.decode_event(msg.data, msg.subject)
    except codec.DecodeError:
        await _reject(js, stage, msg, f"undecodable after {MAX_DELIVER} attempts: {exc!r}")
        return
    event = RequestFailed(
        **envelope(original.request_id, f"failed-at-{stage}", now_utc(), original.policy_version),
        stage=stage,
        reason="request_failed",
        detail=f"gave up after {MAX_DELIVER} attempts: {exc!r}"[:1000],
        reply_to=getattr(original, "reply_to", None),
        reservation=_reservation_of(original),
    )
    if await _safe(publish(js, event)):
        await _safe(msg.ack())


def _reservation_of(event: AnyEvent) -> Reservation | None:
    """The money the failed message held, so the budget releases it at once.

    Stages after the router carry it as `.reservation`; the router's input, `BudgetReserved`, is it.
    """
    if isinstance(event, BudgetReserved):
        return Reservation(team=event.team, period=event.period, micros=event.amount_micros)
    held = getattr(event, "reservation", None)
    return held if isinstance(held, Reservation) else None


async def _safe(aw: Awaitable[object]) -> bool:
    try:
        await aw
    except Exception as exc:  # the message stays unacked and is redelivered: nothing is lost
        log.error("bus operation failed: %r", exc)
        return False
    return True


async def run_stages(stages: Sequence[Awaitable[None]]) -> None:
    """Run a service's loops together; the first failure cancels the rest."""
    async with asyncio.TaskGroup() as tg:
        for s in stages:
            tg.create_task(s)  # type: ignore[arg-type]


__all__ = ["CONSUMERS", "MAX_DELIVER", "BadRequestError", "consume", "ensure_topology", "publish"]
