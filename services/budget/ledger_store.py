"""The budget's view of the stream: rebuild the projection, catch up a team, write with CAS.

Concurrency control is JetStream's own, never a lock of ours: each ledger write carries
`Nats-Expected-Last-Subject-Sequence` over the team's ledger subjects, so a replica that did not
see another's write is refused (err_code 10071), catches up and decides again. No lock of ours.
The projection is rebuilt at start from a snapshot in the object store `GW_BUDGET` plus the ledger
events after it, so a start does not replay the whole history.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import types
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, NotFoundError

from ...schemas import codec, subjects
from ...schemas.events import BudgetRejected, BudgetReleased, BudgetReserved, BudgetSettled, BudgetThresholdCrossed
from .. import bus
from .decider import BudgetState, evolve

log = logging.getLogger("enclave_gateway.budget")
LEDGER_ALL = "gw.evt.ledger.>"
REFUSALS_ALL = "gw.evt.budget.rejected.>"
SNAPSHOT_BUCKET = "GW_BUDGET"
SNAPSHOT_KEY = "projection"
LedgerEvent = BudgetReserved | BudgetSettled | BudgetReleased | BudgetThresholdCrossed


async def read_object(js: JetStreamContext, bucket: str, key: str) -> bytes:
    """An object of a JetStream object store, read chunk by chunk with direct gets.

    nats-py's `ObjectStore.get` reads through a consumer it creates; the right to create consumers
    on the bucket's stream would let a budget credential push stored bytes to any subject (a hostile
    review did exactly that), so the budget reads with gets only and its digest is checked here.
    """
    stream = f"OBJ_{bucket}"
    meta = await js.get_last_msg(stream, f"$O.{bucket}.M.{base64.urlsafe_b64encode(key.encode()).decode()}",
                                 direct=True)
    info = msgspec.json.decode(meta.data or b"", type=_ObjectMeta)
    chunks, seq, h = [], 0, hashlib.sha256()
    for _ in range(info.chunks):
        raw = await js.get_msg(stream, seq=seq + 1, subject=f"$O.{bucket}.C.{info.nuid}", next=True, direct=True)
        seq = int(raw.seq or 0)
        chunks.append(raw.data or b"")
        h.update(raw.data or b"")
    data = b"".join(chunks)
    if len(data) != info.size or "SHA-256=" + base64.urlsafe_b64encode(h.digest()).decode() != info.digest:
        raise ValueError(f"object {bucket}/{key}: size or digest does not match its metadata")
    return data


class _ObjectMeta(msgspec.Struct):
    nuid: str
    size: int
    chunks: int
    digest: str


Headers = dict[str, str] | None
OWN: dict[str, str] = {}  # the headers argument of a fact this replica has just written itself


class LedgerConflict(Exception):
    """Another writer got to the team's ledger first."""


class Snapshot(msgspec.Struct, kw_only=True):
    """The projection as of stream sequence `seq` (every ledger event up to it folded)."""

    seq: int
    last_seq: dict[str, int]
    state: BudgetState
    refusals_through: int = 0  # the highest refusal sequence folded (older snapshots: none)
    refused_seq: dict[str, int] = {}
    # Written by a replica that had read the whole ledger through `seq`. An older snapshot's `seq` was
    # only the highest sequence it had folded, and a replica catching up one team at a time may have
    # folded another team's later fact without the facts other replicas wrote before it (found
    # when two budget processes served several teams): such a snapshot is not used.
    complete: bool = False


class LedgerStore:
    """The projection, the last ledger sequence seen per team, and the highest folded overall."""

    def __init__(self, js: JetStreamContext, snapshot_key: str = SNAPSHOT_KEY) -> None:
        self.js = js
        self.snapshot_key = snapshot_key  # every replica of a deployment shares one; a test uses its own
        self.state = BudgetState()
        self.last_seq: dict[str, int] = {}  # per team: its ledger is folded through this sequence
        self.seq = 0  # the whole ledger is folded through this sequence (what a snapshot may claim)
        # Refusals live outside the ledger (they never conflict with writes) but close their request
        # all the same, so they are folded too: at rebuild, and on a redelivered authorization.
        self.refused_seq: dict[str, int] = {}
        self.refusals_through = 0

    def _fold(self, seq: int, subject: str, data: bytes, headers: Headers = None) -> None:
        # Whatever is stored on a team's ledger subject moves its compare-and-set sequence, so the
        # sequence advances even for bytes that are not a ledger fact published there (junk a
        # hostile credential made the server store); only a real one changes the money.
        team = subject.rsplit(".", 1)[-1]  # team names are subject tokens (policy/bundle.py)
        if seq <= self.last_seq.get(team, 0):
            # folded already: a team's ledger is always folded as a prefix (each catch-up reads on from
            # the team's mark), so a fact at or below it is one the whole-ledger read meets again. Folded
            # twice, an older fact's totals would overwrite newer ones while a decision is pending.
            return
        self.last_seq[team] = seq
        self._apply(seq, subject, data, headers, LedgerEvent, "a ledger fact")

    def fold_refusal(self, seq: int, subject: str, data: bytes, headers: Headers = None) -> None:
        """Fold a stored BudgetRejected, read in stream order: its request is closed, and the refusals
        through `seq` are known (junk on the subject moves the marks, nothing else)."""
        team = subject.rsplit(".", 1)[-1]
        self.refused_seq[team] = max(self.refused_seq.get(team, 0), seq)
        self.refusals_through = max(self.refusals_through, seq)
        self._apply(seq, subject, data, headers, BudgetRejected, "a refusal")

    def note_refusal(self, event: BudgetRejected) -> None:
        """Fold this replica's own refusal at once. The marks do not move: refusals carry no
        compare-and-set, so another replica's may sit below this one, and only a tail read in
        order may say that every refusal up to a sequence is folded."""
        self.state = evolve(self.state, event)

    def _apply(self, seq: int, subject: str, data: bytes, headers: Headers, kinds: type[Any] | types.UnionType,
               what: str) -> None:
        """Fold a stored message into the money when it is one of `kinds` and the budget signed it
        (`headers` OWN: one this replica just wrote); junk and forgeries are logged and skipped."""
        try:
            if headers is not OWN:
                bus.owner_of(self.js, subject, headers, data)
            event = codec.decode_event(data, subject)
        except codec.DecodeError as exc:
            log.error("seq %d on %s is not %s, skipped: %s", seq, subject, what, exc)
            return
        if isinstance(event, kinds):
            self.state = evolve(self.state, event)

    async def rebuild(self) -> int:
        """Snapshot, then every later ledger event and refusal; returns the number of events read."""
        await self._load_snapshot()
        count = await self.catch_up_all()
        newest = await self._newest(REFUSALS_ALL)
        return count + await self._tail(REFUSALS_ALL, self.refusals_through + 1, newest, self.fold_refusal)

    async def catch_up_all(self) -> int:
        """Fold every ledger fact of every team not yet folded, in stream order; then the whole ledger
        is folded through its newest sequence, which a snapshot may claim. Returns the facts read."""
        newest = await self._newest(LEDGER_ALL)
        count = await self._tail(LEDGER_ALL, self.seq + 1, newest) if newest > self.seq else 0
        self.seq = max(self.seq, newest)
        return count

    async def _newest(self, filter_subject: str) -> int:
        try:
            return int((await self.js.get_last_msg(subjects.STREAM, filter_subject, direct=True)).seq or 0)
        except NotFoundError:
            return 0

    async def _tail(self, filter_subject: str, start: int, until: int,
                    fold: Callable[[int, str, bytes, Headers], None] | None = None) -> int:
        """Fold the events on `filter_subject` from `start` through `until` (a reader of our own,
        filtered to the ledger or the refusals: exactly what the registry allows the budget)."""
        count, fold = 0, fold or self._fold
        messages = bus.stored_between(self.js, filter_subject, "budget_tail", start, until)
        async with contextlib.aclosing(messages) as msgs:
            async for msg in msgs:
                fold(msg.metadata.sequence.stream, msg.subject, msg.data, msg.headers)
                count += 1
        return count

    async def catch_up_all_refusals(self) -> None:
        """Fold every refusal not yet read in order (housekeeping, before a snapshot records the mark)."""
        await self._refusals_after(REFUSALS_ALL, self.refusals_through)

    async def catch_up_refusals(self, team: str) -> None:
        """Fold the team's refusals this replica has not seen: another replica may have refused a
        request whose authorization is now delivered again here."""
        await self._refusals_after(subjects.budget_rejected(team), self.refused_seq.get(team, 0))

    async def _refusals_after(self, filter_subject: str, known: int) -> None:
        newest = await self._newest(filter_subject)
        if newest > known:
            await self._tail(filter_subject, known + 1, newest, self.fold_refusal)

    async def _load_snapshot(self) -> None:
        try:
            data = await read_object(self.js, SNAPSHOT_BUCKET, self.snapshot_key)
            snap = msgspec.json.decode(data, type=Snapshot)
        except Exception as exc:  # no bucket, no snapshot, or a bad one: a full replay is still correct
            log.info("no usable budget snapshot (%r): replaying the ledger", exc)
            return
        if not snap.complete:
            log.info("budget snapshot at seq %d predates whole-ledger marks: replaying the ledger", snap.seq)
            return
        self.state, self.last_seq, self.seq = snap.state, dict(snap.last_seq), snap.seq
        self.refused_seq, self.refusals_through = dict(snap.refused_seq), snap.refusals_through
        log.info("budget snapshot at seq %d loaded", snap.seq)

    async def save_snapshot(self) -> int:
        """Store the projection; any replica may, a newer one simply has less to replay. It claims the
        whole ledger through `seq` only: facts of some teams folded beyond it are read again at a
        rebuild and skipped by their team's mark."""
        store = await self.js.object_store(SNAPSHOT_BUCKET)
        data = msgspec.json.encode(Snapshot(seq=self.seq, last_seq=self.last_seq, state=self.state,
                                           refusals_through=self.refusals_through, refused_seq=self.refused_seq,
                                           complete=True))
        await store.put(self.snapshot_key, data)  # chunked: the projection may outgrow one message
        return self.seq

    async def catch_up(self, team: str) -> None:
        """Fold the team's ledger events this replica has not seen.

        One scoped direct get of the team's newest ledger fact (the budget may read its ledger and
        nothing else of the stream). Each ledger write carries the sequence it expected before it,
        and the server keeps that header: when it names our last seen sequence, the newest fact is
        the only one we missed. Otherwise a short tail over the team's ledger folds the gap.
        """
        known = self.last_seq.get(team, 0)
        try:
            raw = await self.js.get_last_msg(subjects.STREAM, subjects.ledger_filter(team), direct=True)
        except NotFoundError:
            return
        newest = int(raw.seq or 0)
        if newest <= known:
            return
        previous = (raw.headers or {}).get(Header.EXPECTED_LAST_SUBJECT_SEQUENCE)
        if previous is not None and previous.isdigit() and int(previous) == known:
            self._fold(newest, raw.subject or "", raw.data or b"", raw.headers)
            return
        await self._tail(subjects.ledger_filter(team), known + 1, newest)

    async def write(self, event: LedgerEvent) -> None:
        """Append a ledger event only if the team's ledger is where this replica last saw it."""
        team = event.team
        headers = {
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(self.last_seq.get(team, 0)),
            # built from the same team name as the subject: a mismatch would silently disable the check
            "Nats-Expected-Last-Subject-Sequence-Subject": subjects.ledger_filter(team),
        }
        try:
            ack = await bus.publish_ack(self.js, event, headers=headers)
        except APIError as exc:
            if exc.err_code in bus.WRONG_LAST_SEQUENCE:
                raise LedgerConflict(str(exc)) from exc
            raise
        if ack.duplicate:  # written before under this Nats-Msg-Id: the catch-up folds the stored one
            return
        self._fold(int(ack.seq), subjects.for_event(event), codec.encode(event), OWN)
