"""Auditor shell: follow every subject, append rows to Parquet, ack only once they are on disk."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ...schemas import subjects
from .. import bus, keys, worker
from ..settings import WorkerSettings
from . import parquet_sink
from .checkpointer import Checkpointer
from .decider import AuditorState, AuditRow, row_for

log = logging.getLogger("enclave_gateway.auditor")
FLUSH_ROWS = 2000
FLUSH_AGE_S = 0.5
GAP_READ_WAIT_S = 10.0
GAP_READ_TRIES = 3


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, flushing what is buffered on the way out."""
    audit_dir = settings.audit_dir
    state = await asyncio.to_thread(parquet_sink.resume_state, audit_dir)
    key = keys.ensure_key(settings.audit_key_file)  # 0600 in the data dir; its public half goes in the register
    digest_key = keys.ensure_secret(settings.audit_digest_key_file)
    async with worker.without_policy(settings, "auditor") as s:
        chain = Checkpointer(s.js, key, settings.audit_checkpoint_events, settings.audit_checkpoint_s)
        checkpointing = asyncio.create_task(chain.run(stop))
        try:
            await _serve(s.js, settings, state, digest_key, stop)
        finally:
            if not stop.is_set():  # the loop ended on its own: end the process, so it is restarted
                log.error("auditor: stopped auditing before it was told to; exiting")
                checkpointing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpointing


class GapReader:
    """Stream sequences first..last in order, read by an ordered consumer of the auditor's own.

    The durable delivers in stream order except what it redelivers: a restarted auditor gets new
    messages at once and those its predecessor had fetched but not acked only after `ack_wait`.
    Hashing the new ones first chained them to the wrong predecessor and skipped the old ones when
    they came (a fault test found the hole); so a gap is read here, before the message after it.

    With several replicas on the shared durable every batch has gaps (the others' share), each
    starting where the last ended: one reader then serves them all, where a reader per read put
    dozens of consumers on the stream at once. It is closed as soon as a batch has no gap, so a
    lone auditor holds no reader buffering the stream it already gets from the durable.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.sub: JetStreamContext.PushSubscription | None = None
        self.next = 0

    async def read(self, first: int, last: int) -> AsyncIterator[Msg]:
        """The messages first..last. A reader that stops answering (nats-py re-creates an ordered
        consumer under its old name after a reset, which the server refuses while the old one
        lives) is replaced by a new one from the next sequence wanted, a few times before giving up."""
        if self.sub is None or self.next != first:
            await self._open(first)
        self.next, wanted, failures = -1, first, 0  # until the read ends where asked, the next one reopens
        while True:
            assert self.sub is not None
            try:
                msg = await self.sub.next_msg(timeout=GAP_READ_WAIT_S)
            except (TimeoutError, nats.errors.Error):
                failures += 1
                if failures > GAP_READ_TRIES:
                    raise
                await self._open(wanted)
                continue
            seq = msg.metadata.sequence.stream
            if seq < wanted:
                continue  # already yielded
            wanted = seq + 1
            yield msg
            if seq >= last:
                self.next = last + 1
                return

    async def _open(self, first: int) -> None:
        await self.close()
        log.info("auditor: reading the stream from seq %d: a gap the durable left", first)
        self.sub = await bus.own_reader(self.js, subjects.ALL_EVENTS, "auditor", first)

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.sub.unsubscribe()
        self.sub, self.next = None, 0


async def _serve(js: JetStreamContext, settings: WorkerSettings, state: AuditorState, digest_key: bytes,
                 stop: asyncio.Event) -> None:
    audit_dir = settings.audit_dir
    psub = await js.pull_subscribe_bind("auditor", stream=subjects.STREAM)
    rows: list[AuditRow] = []
    msgs: list[Msg] = []
    first_at = 0.0
    gaps = GapReader(js)
    log.info("auditor consuming")

    async def flush() -> None:
        nonlocal rows, msgs
        if rows:
            await asyncio.to_thread(parquet_sink.write_rows, audit_dir, rows)
        for m in msgs:
            await m.ack()
        rows, msgs = [], []

    try:
        while not stop.is_set():
            try:
                batch = await psub.fetch(500, timeout=FLUSH_AGE_S)
            except (TimeoutError, nats.errors.TimeoutError):
                batch = []
            except nats.errors.ConnectionClosedError:
                raise
            except nats.errors.Error as exc:  # the bus is away or answered oddly: its OutageLog says so, retry
                log.debug("auditor: fetch failed: %r", exc)  # (ending here left the process up, auditing nothing)
                await asyncio.sleep(0.5)
                batch = []
            batch.sort(key=lambda m: m.metadata.sequence.stream)
            if not batch or not _holes(state.seq, [m.metadata.sequence.stream for m in batch]):
                await gaps.close()
            else:
                # the chain has no holes: what a crash left unacked, or another replica's share of
                # the durable, is read from the stream first, the whole range in one read (a read
                # per hole made a consumer per message with several replicas, and the stream's
                # 1,000-consumer limit was reached within seconds: bench/scaling.py found it)
                async for gap in gaps.read(state.seq + 1, batch[-1].metadata.sequence.stream):
                    row, state = row_for(state, gap.metadata.sequence.stream, gap.subject, gap.data,
                                         gap.metadata.timestamp or bus.now_utc(), digest_key,
                                         bus.unsigned(js, gap.subject, gap.headers, gap.data))
                    rows.append(row)
                    if len(rows) >= FLUSH_ROWS:  # a long gap (a new replica on a long stream) is
                        await flush()  # written as it is read, never held whole in memory
            for m in batch:
                seq = m.metadata.sequence.stream
                if seq > state.seq:  # a redelivery of a row already on disk is skipped
                    row, state = row_for(state, seq, m.subject, m.data, m.metadata.timestamp or bus.now_utc(),
                                         digest_key, bus.unsigned(js, m.subject, m.headers, m.data))
                    rows.append(row)
                msgs.append(m)
            if msgs and not first_at:
                first_at = time.monotonic()
            if msgs and (len(msgs) >= FLUSH_ROWS or time.monotonic() - first_at >= FLUSH_AGE_S):
                await flush()
                first_at = 0.0
        await flush()
    finally:
        await gaps.close()
        await psub.unsubscribe()


def _holes(folded: int, seqs: list[int]) -> bool:
    """Whether the sorted stream sequences `seqs` leave a gap after `folded`, the last one folded."""
    expected = folded + 1
    for seq in seqs:
        if seq < expected:
            continue  # a redelivery of one already folded
        if seq > expected:
            return True
        expected += 1
    return False
