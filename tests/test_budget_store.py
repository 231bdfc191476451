"""The budget projection on the real stream, as the `budget` NATS user: snapshot plus tail
equals a full replay, and catch-up sees another replica's writes."""

from __future__ import annotations

import uuid

import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus
from enclave_gateway.services.budget.ledger_store import LedgerStore
from nats.aio.client import Client

from .conftest import wait_for_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def own_snapshot() -> str:
    """A snapshot key of the test's own: the running budget worker snapshots every few seconds, and
    its snapshot would replace the one under test (a CI run). The stack's workers run in this
    process, so patching the module's key moved theirs too (another CI run): stores take it instead."""
    return f"projection-test-{uuid.uuid4().hex}"


class _NoSnapshot(LedgerStore):
    async def _load_snapshot(self) -> None:
        return None


async def _request(client: Client, admin: Client, token: str) -> None:
    """One request, returned once its settlement is in the ledger (it lands after the reply)."""
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="ledger"),), max_tokens=2)
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(
        SubmitRequest(token=token, chat=chat)), timeout=30)).data)
    assert reply.completion is not None
    await wait_for_event(admin, reply.request_id, "BudgetSettled")


async def test_snapshot_plus_tail_equals_a_full_replay(admin: Client, client: Client, token_for, stack,
                                                       own_snapshot: str) -> None:
    nc = await bus.connect(stack, "budget")
    try:
        js = nc.jetstream()
        token = token_for("gamma")
        await _request(client, admin, token)
        first = LedgerStore(js, own_snapshot)
        await first.rebuild()
        assert first.seq > 0
        assert await first.save_snapshot() == first.seq
        for _ in range(3):
            await _request(client, admin, token)
        await first.catch_up("gamma")
        resumed, full = LedgerStore(js, own_snapshot), _NoSnapshot(js)
        read_after_snapshot = await resumed.rebuild()
        read_all = await full.rebuild()
        assert 0 < read_after_snapshot < read_all
        for other in (resumed, full):
            await other.catch_up("gamma")
        assert resumed.state == full.state
        assert resumed.last_seq["gamma"] == full.last_seq["gamma"]
    finally:
        await nc.close()


async def test_a_snapshot_claims_only_what_its_replica_read_of_every_teams_ledger(
        admin: Client, client: Client, token_for, stack, own_snapshot: str) -> None:
    """A replica catches up one team at a time. One that had read team alpha's newest fact but not
    gamma's older one (another replica wrote it) used to snapshot alpha's sequence as if it had read
    everything below it; a rebuild from that snapshot then never folded gamma's fact."""
    nc = await bus.connect(stack, "budget")
    try:
        js = nc.jetstream()
        mine = LedgerStore(js, own_snapshot)
        await mine.rebuild()
        await _request(client, admin, token_for("gamma"))  # written by the running worker: unread here
        await _request(client, admin, token_for("alpha"))
        await mine.catch_up("alpha")  # alpha's newest fact is read, gamma's older one is not
        await mine.save_snapshot()
        resumed, full = LedgerStore(js, own_snapshot), _NoSnapshot(js)
        await resumed.rebuild()
        await full.rebuild()
        assert resumed.state.ledgers == full.state.ledgers and resumed.last_seq == full.last_seq
        assert resumed.state.open == full.state.open and resumed.seq == full.seq
    finally:
        await nc.close()


async def test_catch_up_folds_writes_made_by_another_replica(admin: Client, client: Client, token_for, stack) -> None:
    nc = await bus.connect(stack, "budget")
    try:
        mine = LedgerStore(nc.jetstream())
        await mine.rebuild()
        before = mine.last_seq.get("gamma", 0)
        await _request(client, admin, token_for("gamma"))  # the running budget worker writes, not `mine`
        await mine.catch_up("gamma")
        assert mine.last_seq["gamma"] > before
        key = next(k for k in mine.state.ledgers if k.startswith("gamma/"))
        assert mine.state.ledgers[key].spent > 0
    finally:
        await nc.close()


async def test_a_refusal_closes_its_request_for_every_replica(admin: Client, client: Client, token_for,
                                                              stack) -> None:
    """A refused request is closed on the stream: a replica rebuilding, or one handed the authorization
    again after another refused it, folds the refusal and would reserve nothing for it."""
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="too much"),), max_tokens=4000)
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(
        SubmitRequest(token=token_for("tight"), chat=chat)), timeout=30)).data)
    assert reply.error is not None and reply.error.code == "budget_exceeded"
    nc = await bus.connect(stack, "budget")
    try:
        rebuilt = LedgerStore(nc.jetstream())
        await rebuilt.rebuild()
        assert reply.request_id in rebuilt.state.closed
        stale = LedgerStore(nc.jetstream())  # a replica that never saw the refusal
        assert reply.request_id not in stale.state.closed
        await stale.catch_up_refusals("tight")
        assert reply.request_id in stale.state.closed
    finally:
        await nc.close()


async def test_a_replicas_own_refusal_does_not_hide_a_lower_one_another_replica_wrote(
        admin: Client, stack) -> None:
    """Refusals carry no compare-and-set: replica B's refusal of X may be stored below replica A's of
    Y. A folding its own must not mark X as read, or X's redelivered authorization would reserve."""
    from datetime import UTC, datetime

    from enclave_gateway.schemas.events import BudgetRejected, Caller, envelope

    def refusal(rid: str) -> BudgetRejected:
        return BudgetRejected(**envelope(rid, "reserve", datetime.now(UTC), "test"),
                              caller=Caller(subject="s", team="tight"), model_id="enclave-tiny", period="2026-11",
                              requested_micros=10, remaining_micros=0, cap_micros=700, reason="budget_exceeded",
                              reply_to="")

    nc = await bus.connect(stack, "budget")
    try:
        replica_a = LedgerStore(nc.jetstream())
        await replica_a.rebuild()
        x, y = refusal(uuid.uuid4().hex), refusal(uuid.uuid4().hex)
        for event in (x, y):  # B's refusal of X, then A's of Y, stored in that order
            await bus.publish(nc.jetstream(), event)
        replica_a.note_refusal(y)
        assert y.request_id in replica_a.state.closed and x.request_id not in replica_a.state.closed
        await replica_a.catch_up_refusals("tight")
        assert x.request_id in replica_a.state.closed
    finally:
        await nc.close()
