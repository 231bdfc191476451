"""The auditor's checkpoint loop: follow the whole stream in order, fold the hash chain, and publish
signed `AuditCheckpoint`s. Bus I/O only; the decisions are in
`checkpoints.py`.

Exactly one chain, whatever the number of auditor replicas: each replica reads the stream itself
(an ordered consumer of its own, not the shared durable, which splits messages between replicas),
and a checkpoint is published with `Nats-Expected-Last-Subject-Sequence` on the checkpoint subject,
JetStream's own compare-and-set. A replica that loses the race re-reads the checkpoints, checks
the winner's head against its own, and continues after it; it can neither fork nor interleave.
A restarted auditor resumes after the latest valid checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError

from ...schemas import codec, subjects
from ...schemas.events import AuditCheckpoint
from .. import bus, keys
from . import checkpoints
from .checkpoints import Cursor

log = logging.getLogger("enclave_gateway.auditor")
REMEMBERED_HEADS = 100_000  # chain heads kept to check another replica's checkpoint against ours


class Checkpointer:
    """One replica's view of the chain and of the checkpoint subject."""

    def __init__(self, js: JetStreamContext, key: Ed25519PrivateKey, every_events: int, every_s: float) -> None:
        self.js, self.key, self.every_events, self.every_s = js, key, every_events, every_s
        self.public = keys.public_of(key)
        self.cursor = Cursor()
        self.subject_seq = 0  # stream sequence of the newest message on the checkpoint subject
        self.heads: dict[int, str] = {}
        self.published = 0

    def valid(self, cp: AuditCheckpoint) -> bool:
        """Signed by this deployment's audit key over exactly its chain position."""
        return checkpoints.signed_by(cp, self.public)

    async def resume(self) -> None:
        """Continue after the valid checkpoint that vouches for the furthest position."""
        best: AuditCheckpoint | None = None
        self.subject_seq = 0
        found: list[AuditCheckpoint] = []
        for data, subject, seq, headers in await bus.stored_with_headers(
                self.js, subjects.audit_checkpoint(), "auditor"):
            self.subject_seq = max(self.subject_seq, seq)  # junk on the subject still moves the CAS
            try:
                bus.owner_of(self.js, subject, headers, data)
                found.append(codec.decode_as(data, AuditCheckpoint, subject))
            except codec.DecodeError:
                continue
        # furthest first, checked until one is valid: verifying every signature ever stored held
        # the event loop for minutes on a long-lived stream (and the supervisor takes that for a hang)
        for cp in sorted(found, key=lambda c: c.seq, reverse=True):
            if self.valid(cp):
                best = cp
                break
        if best is not None and best.seq in self.heads and self.heads[best.seq] != best.head:
            log.critical("checkpoint at seq %d has head %s, this replica computed %s: the chain was forked",
                         best.seq, best.head, self.heads[best.seq])
        self.cursor = checkpoints.resumed(best) if best else Cursor()
        self.heads = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream until `stop` is set, checkpointing when one is due."""
        while not stop.is_set():
            await self.resume()
            await self._follow(stop)

    async def _follow(self, stop: asyncio.Event) -> None:
        sub = await bus.own_reader(self.js, subjects.ALL_EVENTS, "auditor_chain", self.cursor.seq + 1)
        last_checkpoint = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=min(1.0, self.every_s))
                except (TimeoutError, nats.errors.TimeoutError):
                    msg = None
                if msg is not None:
                    seq = msg.metadata.sequence.stream
                    self.cursor = checkpoints.advance(self.cursor, seq, msg.subject, msg.data)
                    self._remember(seq)
                elapsed = time.monotonic() - last_checkpoint
                if checkpoints.due(self.cursor, self.every_events, elapsed, self.every_s):
                    if not await self._publish():
                        return  # another replica checkpointed first: resume after it
                    last_checkpoint = time.monotonic()
        finally:
            await sub.unsubscribe()

    def _remember(self, seq: int) -> None:
        self.heads[seq] = self.cursor.head
        if len(self.heads) > REMEMBERED_HEADS:
            del self.heads[next(iter(self.heads))]

    async def _publish(self) -> bool:
        """Publish a checkpoint at the cursor; False when the subject moved under us."""
        signature = keys.sign(self.key, checkpoints.unsigned(self.cursor))
        cp = checkpoints.checkpoint(self.cursor, self.public.kid, signature, bus.now_utc())
        headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(self.subject_seq)}
        try:
            ack = await bus.publish_ack(self.js, cp, headers=headers)
        except APIError as exc:
            if exc.err_code in bus.WRONG_LAST_SEQUENCE:
                log.info("checkpoint at seq %d lost the race; resuming after the winner", cp.seq)
                return False
            raise
        if ack.duplicate:
            return False
        self.subject_seq = int(ack.seq)
        self.cursor = checkpoints.vouched(self.cursor, cp)
        self.published += 1
        log.info("checkpoint at seq %d head %s", cp.seq, cp.head[:16])
        return True
