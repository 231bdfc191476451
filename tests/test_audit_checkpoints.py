"""Signed checkpoints of the audit hash chain (issue 9 item 3): one chain over the whole stream,
whatever the number of auditor replicas, resumed after a restart, and never moved by a forged or
replayed checkpoint."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import msgspec
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import AuditCheckpoint
from enclave_gateway.services import bus, keys
from enclave_gateway.services.auditor import checkpoints
from enclave_gateway.services.auditor.checkpointer import Checkpointer
from enclave_gateway.services.auditor.decider import GENESIS, chain
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APP

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_checkpoints_of_checkpoints_are_never_due() -> None:
    cursor = checkpoints.Cursor()
    cursor = checkpoints.advance(cursor, 1, "gw.evt.request.submitted", b"a")
    assert checkpoints.due(cursor, 1, 0.0, 60.0) and not checkpoints.due(cursor, 2, 0.0, 60.0)
    assert checkpoints.due(cursor, 2, 61.0, 60.0)  # time, once anything arrived
    cp = checkpoints.checkpoint(cursor, "k", "s", NOW)
    after = checkpoints.vouched(cursor, cp)
    after = checkpoints.advance(after, 2, subjects.audit_checkpoint(), codec.encode(cp))
    assert after.pending == 0 and not checkpoints.due(after, 1, 3600.0, 60.0)  # an idle stream stays idle
    assert after.head == chain(cursor.head, 2, subjects.audit_checkpoint(), hashlib.sha256(codec.encode(cp)).hexdigest())
    assert (cp.previous_seq, cp.previous_head, cp.count) == (0, GENESIS, 1)


async def _traffic(stack: WorkerSettings, token: str, n: int) -> None:
    nc = await bus.connect(stack, f"app.{APP}")
    try:
        body = codec.encode(SubmitRequest(token=token, chat=ChatBody(
            model="enclave-tiny", messages=(ChatMessage(role="user", content="chain me"),), max_tokens=2)))
        await asyncio.gather(*(nc.request(subjects.submit(APP), body, timeout=30) for _ in range(n)))
    finally:
        await nc.close()


async def _recompute(admin: Client, until: int) -> dict[int, str]:
    """The chain head at every sequence, recomputed from the stream alone (every stored message,
    signed or not: the chain covers them all)."""
    heads, head = {}, GENESIS
    for data, subject, seq, _ in await bus.stored_with_headers(admin.jetstream(), subjects.ALL_EVENTS, "test"):
        if seq > until:
            break
        head = chain(head, seq, subject, hashlib.sha256(data).hexdigest())
        heads[seq] = head
    return heads


async def _checkpoints(admin: Client) -> list[AuditCheckpoint]:
    out = []
    for data, subject, _ in await bus.stored_on(admin.jetstream(), subjects.audit_checkpoint(), "test"):
        try:
            out.append(codec.decode_as(data, AuditCheckpoint, subject))
        except codec.DecodeError:
            continue
    return out


async def test_two_replicas_write_one_signed_chain_that_matches_the_stream_and_resumes(
        admin: Client, stack: WorkerSettings, token_for) -> None:
    key = keys.ensure_key(stack.audit_key_file)
    conns = [await bus.connect(stack, "auditor") for _ in range(2)]  # what the registry grants the auditor
    replicas = [Checkpointer(nc.jetstream(), key, every_events=3, every_s=0.2) for nc in conns]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in replicas]
    try:
        await _traffic(stack, token_for("gamma"), 6)
        for _ in range(60):
            if sum(r.published for r in replicas) >= 3:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for nc in conns:
            await nc.close()
    mine = [cp for cp in await _checkpoints(admin) if cp.signer == keys.public_of(key).kid]
    assert len(mine) >= 3
    assert all(replicas[0].valid(cp) for cp in mine)
    heads = await _recompute(admin, max(cp.seq for cp in mine))
    previous = (mine[0].previous_seq, mine[0].previous_head)
    for cp in mine:  # in stream order: one chain, no fork, no interleaving
        assert (cp.previous_seq, cp.previous_head) == previous, "the checkpoints fork"
        assert cp.seq > cp.previous_seq and cp.head == heads[cp.seq], "a checkpoint disagrees with the stream"
        previous = (cp.seq, cp.head)
    restarted = Checkpointer(admin.jetstream(), key, every_events=3, every_s=0.2)
    await restarted.resume()
    assert (restarted.cursor.seq, restarted.cursor.head) == previous


async def test_a_forged_or_replayed_checkpoint_does_not_move_the_chain(admin: Client, stack: WorkerSettings) -> None:
    key = keys.ensure_key(stack.audit_key_file)
    before = Checkpointer(admin.jetstream(), key, every_events=3, every_s=0.2)
    await before.resume()
    js = admin.jetstream()
    pem, _ = keys.generate()
    other = keys.load_private_pem(pem)
    far = checkpoints.Cursor(seq=before.cursor.seq + 10_000, head="ab" * 32)
    forged = checkpoints.checkpoint(far, keys.public_of(other).kid, keys.sign(other, checkpoints.unsigned(far)), NOW)
    await bus.publish(js, forged)  # another key: not this deployment's audit signer
    lying = msgspec.structs.replace(forged, signer=keys.public_of(key).kid)
    await bus.publish(js, msgspec.structs.replace(lying, event_id="lying:checkpoint"))  # right kid, wrong signature
    stored = await _checkpoints(admin)
    if stored:  # a replayed copy of an old, valid checkpoint
        await bus.publish(js, msgspec.structs.replace(stored[0], event_id="replay:checkpoint"))
    await js.publish(subjects.audit_checkpoint(), b"")  # junk on the subject
    after = Checkpointer(admin.jetstream(), key, every_events=3, every_s=0.2)
    await after.resume()
    assert (after.cursor.seq, after.cursor.head) == (before.cursor.seq, before.cursor.head)
    assert after.subject_seq > before.subject_seq  # the compare-and-set still sees everything stored there


@pytest.mark.parametrize("field", ["seq", "head", "previous_seq", "previous_head"])
def test_the_signature_covers_every_chain_field(field: str) -> None:
    pem, public = keys.generate()
    key = keys.load_private_pem(pem)
    cursor = checkpoints.Cursor(seq=7, head="cd" * 32, checkpoint_seq=3, checkpoint_head="ef" * 32)
    cp = checkpoints.checkpoint(cursor, public.kid, keys.sign(key, checkpoints.unsigned(cursor)), NOW)
    changed = msgspec.structs.replace(cp, **{field: 8 if "seq" in field else "00" * 32})
    assert keys.valid(public.public_key, cp.signature, checkpoints.message(cp.seq, cp.head, cp.previous_seq,
                                                                           cp.previous_head))
    assert not keys.valid(public.public_key, cp.signature, checkpoints.message(
        changed.seq, changed.head, changed.previous_seq, changed.previous_head))
