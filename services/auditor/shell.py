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


async def _stored_between(js: JetStreamContext, first: int, last: int) -> AsyncIterator[Msg]:
    """Stream sequences first..last in order, read by an ordered consumer of the auditor's own.

    The durable delivers in stream order except what it redelivers: a restarted auditor gets new
    messages at once and those its predecessor had fetched but not acked only after `ack_wait`.
    Hashing the new ones first chained them to the wrong predecessor and skipped the old ones when
    they came (a fault test found the hole); so a gap is read here, before the message after it.
    """
    log.info("auditor: reading seq %d..%d, unacknowledged by a predecessor, before seq %d", first, last, last + 1)
    async with contextlib.aclosing(bus.stored_between(js, subjects.ALL_EVENTS, "auditor", first, last)) as msgs:
        async for msg in msgs:
            yield msg


async def _serve(js: JetStreamContext, settings: WorkerSettings, state: AuditorState, digest_key: bytes,
                 stop: asyncio.Event) -> None:
    audit_dir = settings.audit_dir
    psub = await js.pull_subscribe_bind("auditor", stream=subjects.STREAM)
    rows: list[AuditRow] = []
    msgs: list[Msg] = []
    first_at = 0.0
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
            for m in sorted(batch, key=lambda m: m.metadata.sequence.stream):
                seq = m.metadata.sequence.stream
                if seq > state.seq + 1:  # the chain has no holes: read what a crash left unacked first
                    async for gap in _stored_between(js, state.seq + 1, seq - 1):
                        row, state = row_for(state, gap.metadata.sequence.stream, gap.subject, gap.data,
                                             gap.metadata.timestamp or bus.now_utc(), digest_key)
                        rows.append(row)
                if seq > state.seq:  # a redelivery of a row already on disk is skipped
                    row, state = row_for(state, seq, m.subject, m.data, m.metadata.timestamp or bus.now_utc(),
                                         digest_key)
                    rows.append(row)
                msgs.append(m)
            if msgs and not first_at:
                first_at = time.monotonic()
            if msgs and (len(msgs) >= FLUSH_ROWS or time.monotonic() - first_at >= FLUSH_AGE_S):
                await flush()
                first_at = 0.0
        await flush()
    finally:
        await psub.unsubscribe()
