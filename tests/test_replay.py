"""Issue 9 item 5 (in part): every recorded authz, budget and router decision is reproduced with the
policy it was made under; an altered policy or an altered decision is named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from enclave_gateway import cli
from enclave_gateway.replay.engine import Stored, diff, replay
from enclave_gateway.runtime import wait_audited
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import PolicyActivated, RequestDenied
from enclave_gateway.services import bus
from enclave_gateway.services.authz.policy_view import dev_jwks
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APP

pytestmark = pytest.mark.asyncio(loop_scope="session")
SECRET = {"clearance": "SECRET", "compartments": ("SI",), "caveats": ("NOFORN",)}


async def _stored(admin: Client) -> list[Stored]:
    return [(seq, subject, data) for data, subject, seq in
            await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")]


@pytest.fixture(scope="module")
async def window(admin: Client, stack: WorkerSettings, token_for) -> tuple[int, list[Stored]]:
    """A burst of every kind of decision, and the stream after it; returns (first seq, stored)."""
    first = (await admin.jetstream().stream_info(subjects.STREAM)).state.last_seq + 1
    nc = await bus.connect(stack, f"app.{APP}")

    async def ask(token: str, model: str = "enclave-tiny", labels: tuple[str | None, str | None] = (None, None),
                  max_tokens: int = 4, timeout_s: float | None = None) -> None:
        chat = ChatBody(model=model, messages=(ChatMessage(role="user", content="replay me"),), max_tokens=max_tokens)
        body = SubmitRequest(token=token, chat=chat, input_label=labels[0], output_label=labels[1],
                             timeout_s=timeout_s)
        await nc.request(subjects.submit(APP), codec.encode(body), timeout=30)

    try:
        await asyncio.gather(
            ask(token_for("gamma")), ask(token_for("gamma")),  # authorized, reserved, routed, settled
            ask(""),  # token missing
            ask(token_for("gamma", **SECRET), labels=("SECRET//SI", "UNCLASSIFIED")),  # write-down
            ask(token_for("gamma"), model="no-such-model"),  # catalog
            ask(token_for("tight"), max_tokens=4000),  # over the cap
            # routed to an endpoint no invoker hosts: ended at its deadline, released by the budget's clock
            ask(token_for("gamma"), model="analyst-large", timeout_s=1.0),
        )
        await wait_audited(admin, 60)
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    return first, await _stored(admin)


async def test_every_decision_in_the_window_is_reproduced(window: tuple[int, list[Stored]],
                                                          stack: WorkerSettings) -> None:
    first, stored = window
    result = replay(stored, dev_jwks(stack), first=first)
    assert result.ok, [(m.seq, m.decision, m.why, diff(m)) for m in result.mismatches]
    kinds = {subject.split(".")[2] for seq, subject, _ in stored if seq >= first}
    assert {"request", "ledger", "route", "budget"} <= kinds  # authz, budget and router decisions were in it
    assert result.decisions >= 15 and result.reproduced == result.decisions


async def test_an_altered_policy_names_the_decisions_it_made(window: tuple[int, list[Stored]],
                                                             stack: WorkerSettings) -> None:
    """The recorded policy's content changed (one access line dropped): its decisions are named."""
    first, stored = window
    altered: list[Stored] = []
    for seq, subject, data in stored:
        if subject == subjects.policy_activated():
            try:
                event = codec.decode_as(data, PolicyActivated, subject)
            except codec.DecodeError:
                altered.append((seq, subject, data))
                continue
            files = {**event.files, "access_policy.csv": event.files.get("access_policy.csv", "").replace(
                "p, team:gamma, enclave-tiny", "")}
            data = codec.encode(msgspec.structs.replace(event, files=files))
        altered.append((seq, subject, data))
    result = replay(altered, dev_jwks(stack), first=first)
    assert not result.ok and result.policies_refused
    named = {(m.decision, m.request_id) for m in result.mismatches}
    assert any(d == "RequestAuthorized" for d, _ in named) and any(d == "RouteSelected" for d, _ in named)
    assert all("cannot be replayed" in m.why for m in result.mismatches)


async def test_an_altered_decision_is_named_with_a_readable_diff(window: tuple[int, list[Stored]],
                                                                 stack: WorkerSettings) -> None:
    first, stored = window
    altered: list[Stored] = []
    target = None
    for seq, subject, data in stored:
        if target is None and seq >= first and subject.startswith("gw.evt.request.denied."):
            event = codec.decode_as(data, RequestDenied, subject)
            data, target = codec.encode(msgspec.structs.replace(event, rule="lenient-rule")), seq
        altered.append((seq, subject, data))
    result = replay(altered, dev_jwks(stack), first=first)
    [mismatch] = result.mismatches
    assert mismatch.seq == target and mismatch.why == "decided differently"
    assert ("rule", "lenient-rule", str(codec.decode_event(next(d for s, _, d in stored if s == target)).rule)) in diff(
        mismatch)  # type: ignore[union-attr]


async def test_gateway_replay_and_evidence_replay_from_a_package(window: tuple[int, list[Stored]],
                                                                 stack: WorkerSettings, tmp_path: Path) -> None:
    first, _ = window

    def gateway(*argv: str) -> int:  # the CLI runs its own event loop: give it a thread of its own
        return cli.main(list(argv))

    assert await asyncio.to_thread(gateway, "replay", "--from", str(first), "--data-dir", stack.data_dir) == 0
    pkg = str(tmp_path / "pkg")
    assert await asyncio.to_thread(gateway, "evidence", "export", pkg, "--data-dir", stack.data_dir) == 0
    assert await asyncio.to_thread(gateway, "evidence", "verify", pkg) == 0
    assert await asyncio.to_thread(gateway, "replay", "--from", str(first), "--package", pkg) == 0
    assert await asyncio.to_thread(gateway, "replay", "--from", str(first), "--source", "parquet", "--package",
                                   pkg) == 0
    assert await asyncio.to_thread(gateway, "replay", "--source", "parquet", "--data-dir", stack.data_dir) == 2
    assert await asyncio.to_thread(gateway, "replay", "--source", "stream", "--package", pkg) == 2


async def test_every_decision_records_the_input_it_was_decided_from(window: tuple[int, list[Stored]]) -> None:
    """Causation (issue 9 item 1): each decided fact names its input's id and stream sequence."""
    first, stored = window
    by_id = {}
    decided = []
    for seq, subject, data in stored:
        if seq < first:
            continue
        event = codec.decode_event(data, subject)
        by_id[event.event_id] = (seq, event)
        if type(event).__name__ in ("RequestAuthorized", "RequestDenied", "BudgetReserved", "RouteSelected",
                                    "InvocationCompleted", "BudgetSettled"):
            decided.append(event)
    orphans = [e for e in decided if not (e.causation_id in by_id and by_id[e.causation_id][0] == e.causation_seq)]
    assert decided and not orphans, [(e.event_id, e.causation_id, e.causation_seq) for e in orphans]
    pairs = {(type(e).__name__, type(by_id[e.causation_id][1]).__name__) for e in decided if e.causation_id}
    assert {("RequestAuthorized", "RequestSubmitted"), ("BudgetReserved", "RequestAuthorized"),
            ("RouteSelected", "BudgetReserved"), ("InvocationCompleted", "RouteSelected"),
            ("BudgetSettled", "InvocationCompleted")} <= pairs


async def test_a_decision_that_names_the_wrong_input_is_named(window: tuple[int, list[Stored]],
                                                              stack: WorkerSettings) -> None:
    first, stored = window
    altered: list[Stored] = []
    target = None
    for seq, subject, data in stored:
        if target is None and seq >= first and subject.startswith("gw.evt.route.selected."):
            event = codec.decode_event(data, subject)
            data, target = codec.encode(msgspec.structs.replace(event, causation_seq=1)), seq
        altered.append((seq, subject, data))
    result = replay(altered, dev_jwks(stack), first=first)
    assert [(m.seq, "names its input" in m.why) for m in result.mismatches] == [(target, True)]


async def test_a_dev_token_verifies_from_the_stream_alone(window: tuple[int, list[Stored]],
                                                          stack: WorkerSettings) -> None:
    """The dev signer signs the dev issuer's keys into the activation (issue 9 item 1): replay needs no
    key from the data dir, and keys an unpinned signer vouched for are not taken."""
    first, stored = window
    alone = replay(stored, [], first=first, trusted=stack.policy_signers)
    assert alone.ok and alone.decisions > 0
    distrusting = replay(stored, [], first=first, trusted={})
    assert any(m.decision == "RequestAuthorized" for m in distrusting.mismatches)


async def test_replay_names_a_reservation_whose_rate_readings_were_forged(admin: Client, client: Client,
                                                                          stack: WorkerSettings, token_for) -> None:
    """Issue 12, from a hostile review: a reservation's rate readings are observations replay decides
    from, so they are checked. Three requests of the shipped rate-demo application (2 a minute): two
    admitted, one refused; honest replay reproduces them. A reservation rewritten with no counts,
    with its limit raised, or reading what the first one read, is named."""
    import time

    from enclave_gateway.schemas.events import BudgetReserved

    if time.time() % 60 > 45:  # the three must share a minute
        await asyncio.sleep(61 - time.time() % 60)
    first = (await admin.jetstream().stream_info(subjects.STREAM)).state.last_seq + 1
    token = token_for("gamma", subject="rate-demo")
    codes = []
    for i in range(3):
        chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=f"burst {i}"),), max_tokens=4)
        msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(token=token, chat=chat)), timeout=60)
        reply = codec.decode_reply(msg.data)
        codes.append(reply.error.code if reply.error else "ok")
    assert codes == ["ok", "ok", "rate_limited"], codes
    await wait_audited(admin, 60)
    stored = [(seq, subject, data) for data, subject, seq in
              await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")]
    assert replay(stored, dev_jwks(stack), first=first).ok
    at, honest = next((s, e) for s, subj, d in stored if s >= first and subj.startswith("gw.evt.ledger.")
                      and isinstance(e := codec.decode_event(d, subj), BudgetReserved) and e.rates
                      and e.rates[0].observed == 2)
    forged = {
        "no counts": msgspec.structs.replace(honest, rates=()),
        "limit raised": msgspec.structs.replace(
            honest, rates=tuple(msgspec.structs.replace(c, limit=10**9) for c in honest.rates)),
        "same reading as the first": msgspec.structs.replace(
            honest, rates=tuple(msgspec.structs.replace(c, observed=1) for c in honest.rates)),
    }
    for name, event in forged.items():
        swapped = [(s, subj, codec.encode(event)) if s == at else (s, subj, d) for s, subj, d in stored]
        result = replay(swapped, dev_jwks(stack), first=first)
        assert not result.ok and any(m.request_id == honest.request_id for m in result.mismatches), name
