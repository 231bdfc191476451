"""The auditor's Parquet audit: every event lands, the chain matches the stream, SQL answers."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from enclave_gateway import audit_sql, cli, runtime
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services.auditor.decider import GENESIS, chain
from nats.aio.client import Client

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_requests_are_queryable_in_parquet_with_a_chain_matching_the_stream(admin: Client, client: Client, token_for,
                                                                                   stack) -> None:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="audit me"),), max_tokens=4)
    msg = await client.request(subjects.submit("tester"), codec.encode(SubmitRequest(token=token_for("gamma"), chat=chat)),
                               timeout=30)
    rid = codec.decode_reply(msg.data).request_id
    denied = await client.request(subjects.submit("tester"), codec.encode(SubmitRequest(token="", chat=chat)), timeout=30)
    denied_rid = codec.decode_reply(denied.data).request_id
    await asyncio.sleep(0.5)  # let the settlement and deliveries land before the auditor's last batch
    last = await runtime.wait_audited(admin)
    audit = Path(stack.data_dir) / "audit"
    _, rows = audit_sql.query(audit, f"SELECT type FROM events WHERE request_id = '{rid}' ORDER BY seq")
    types = [r[0] for r in rows]
    assert types[:5] == ["RequestSubmitted", "RequestAuthorized", "BudgetReserved", "RouteSelected",
                         "InvocationCompleted"]
    assert {"BudgetSettled", "ResponseDelivered"} <= set(types)
    _, rows = audit_sql.query(audit, f"SELECT reason, rule FROM events WHERE request_id = '{denied_rid}' "
                                     "AND type = 'RequestDenied'")
    assert rows == [("token_missing", "session-token")]
    _, rows = audit_sql.query(audit, f"SELECT count(*) FROM events WHERE request_id = '{rid}' "
                                     "AND (prompt_hmac IS NOT NULL OR completion_hmac IS NOT NULL)")
    assert rows[0][0] == 2

    js = admin.jetstream()
    sub = await js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True)
    head, seq = GENESIS, 0
    while seq < last:
        m = await sub.next_msg(timeout=5)
        seq = m.metadata.sequence.stream
        head = chain(head, seq, m.subject, hashlib.sha256(m.data).hexdigest())
    await sub.unsubscribe()
    _, rows = audit_sql.query(audit, f"SELECT chain_hash, (SELECT count(*) FROM events) FROM events WHERE seq = {last}")
    assert rows[0][0] == head
    assert rows[0][1] == last  # every stored message has exactly one row


async def test_gateway_sql_cli_prints_the_result(stack, capsys: pytest.CaptureFixture[str]) -> None:
    await asyncio.sleep(0)
    assert cli.main(["sql", "SELECT count(*) AS n FROM events WHERE type = 'RequestSubmitted'",
                     "--data-dir", stack.data_dir]) == 0
    out = capsys.readouterr().out
    assert "n" in out and any(ch.isdigit() for ch in out)
