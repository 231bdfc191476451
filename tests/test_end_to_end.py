"""One request through all five workers and the real model server, by both entries."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from enclave_gateway.replay.engine import replay
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.services import bus
from enclave_gateway.services.authz.policy_view import dev_jwks
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from nats.aio.client import Client

from .conftest import stream_events, wait_for_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _submit(token: str, model: str = "enclave-tiny", text: str = "hello", max_tokens: int | None = 8) -> bytes:
    chat = ChatBody(model=model, messages=(ChatMessage(role="user", content=text),), max_tokens=max_tokens,
                    temperature=0.0)
    return codec.encode(SubmitRequest(token=token, chat=chat))


async def test_nats_entry_completes_with_usage_and_records_every_stage(admin: Client, client: Client, token_for) -> None:
    msg = await client.request(subjects.submit("tester"), _submit(token_for("gamma")), timeout=30)
    reply = codec.decode_reply(msg.data)
    assert reply.error is None and reply.completion is not None
    assert reply.completion.model == "enclave-tiny"
    assert reply.completion.usage.completion_tokens == 8
    assert reply.completion.usage.prompt_tokens > 0
    assert len(reply.completion.content) > 0
    settled = await wait_for_event(admin, reply.request_id, "BudgetSettled")
    assert 0 < int(settled["charged_micros"]) <= int(settled["reserved_amount_micros"])  # type: ignore[call-overload]
    await wait_for_event(admin, reply.request_id, "ResponseDelivered")
    types = [b["type"] for _, b in await stream_events(admin, reply.request_id)]
    for expected in ("RequestSubmitted", "RequestAuthorized", "BudgetReserved", "RouteSelected",
                     "InvocationCompleted", "BudgetSettled", "ResponseDelivered"):
        assert expected in types


async def test_every_publish_carries_a_msg_id_matching_the_event_id(admin: Client, client: Client, token_for) -> None:
    msg = await client.request(subjects.submit("tester"), _submit(token_for("gamma")), timeout=30)
    rid = codec.decode_reply(msg.data).request_id
    await wait_for_event(admin, rid, "ResponseDelivered")
    await wait_for_event(admin, rid, "BudgetSettled")  # the settlement lands after the reply (a CI run saw 6)
    js = admin.jetstream()
    sub = await js.subscribe("gw.evt.>", ordered_consumer=True)
    seen = 0
    try:
        while True:
            m = await sub.next_msg(timeout=2)
            try:
                body = json.loads(m.data)
            except (ValueError, RecursionError):  # garbage published by the bad-input tests
                body = {}
            if isinstance(body, dict) and body.get("request_id") == rid:
                # the event id and a tag only the signing stage computes (ids no other stage can claim)
                assert m.headers is not None and m.headers.get("Nats-Msg-Id", "").startswith(body["event_id"] + ":")
                assert m.headers.get("Gw-Sig") and m.headers.get("Gw-Signer")
                seen += 1
            if m.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    assert seen >= 7


async def test_official_openai_client_works_unchanged(http_url: str, token_for) -> None:
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("gamma"), max_retries=0)
    models = await oai.models.list()
    assert "enclave-tiny" in [m.id for m in models.data]
    resp = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, temperature=0)
    assert resp.model == "enclave-tiny"  # the alias resolved to the catalog id
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].message.content
    stream = await oai.chat.completions.create(model="enclave-tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert len(text) > 0
    await oai.close()


async def test_openai_client_sees_our_reason_code_on_refusal(http_url: str, token_for) -> None:
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("bravo"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await oai.chat.completions.create(model="analyst-large", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_forbidden"  # type: ignore[index]
    assert err.value.body["rule"] == "team-model-access"  # type: ignore[index]
    await oai.close()


async def test_deprecated_model_is_swapped_and_the_substitution_recorded(admin: Client, client: Client, token_for) -> None:
    msg = await client.request(subjects.submit("tester"), _submit(token_for("gamma"), model="enclave-tiny-v0"), timeout=30)
    reply = codec.decode_reply(msg.data)
    assert reply.completion is not None and reply.completion.model == "enclave-tiny"
    route = await wait_for_event(admin, reply.request_id, "RouteSelected")
    assert route["substituted_from"] == "enclave-tiny-v0" and route["model_id"] == "enclave-tiny"


async def test_a_request_no_invoker_takes_ends_at_its_deadline_with_its_money_back(admin: Client, client: Client,
                                                                                  stack, token_for) -> None:
    """analyst-large's endpoint is hosted by no invoker here: its route waits on that endpoint's
    durable, and the budget ends the request once its deadline (and grace) passed."""
    chat = ChatBody(model="analyst-large", messages=(ChatMessage(role="user", content="x"),), max_tokens=4)
    cmd = SubmitRequest(token=token_for("gamma"), chat=chat, timeout_s=1.0)
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(cmd), timeout=30)).data)
    assert reply.error is not None and reply.error.code == "timeout" and "deadline" in reply.error.message
    released = await wait_for_event(admin, reply.request_id, "BudgetReleased")
    reserved = await wait_for_event(admin, reply.request_id, "BudgetReserved")
    assert released["amount_micros"] == reserved["amount_micros"] and released["reason"] == "deadline"
    kinds = [b["type"] for _, b in await stream_events(admin, reply.request_id)]
    assert "InvocationCompleted" not in kinds and "InvocationFailed" not in kinds
    assert kinds.count("RequestFailed") == 1 and kinds.count("BudgetReleased") == 1
    # replay re-makes the release from the budget's tick, and the caller's timeout must be its twin:
    # a RequestFailed in the budget's name that no deadline release backs is named (a hostile review
    # forged one with another service's credential)
    stored = [(seq, subj, data) for data, subj, seq in await bus.stored_on(admin.jetstream(), "gw.evt.>", "test")]
    first = next(seq for seq, _, data in stored if reply.request_id.encode() in data)
    assert replay(stored, dev_jwks(stack), first=first).ok
    failed_at = next(seq for seq, subj, data in stored if subj == subjects.request_failed()
                     and reply.request_id.encode() in data)
    forged = [(seq, subj, data.replace(b'"causation_id":"', b'"causation_id":"x') if seq == failed_at else data)
              for seq, subj, data in stored]
    flagged = replay(forged, dev_jwks(stack), first=first)
    assert [m.seq for m in flagged.mismatches] == [failed_at]


async def test_over_budget_request_gets_remaining_and_requested(client: Client, token_for) -> None:
    token = token_for("tight")
    replies = []
    for _ in range(6):
        msg = await client.request(subjects.submit("tester"), _submit(token, max_tokens=16), timeout=30)
        replies.append(codec.decode_reply(msg.data))
    refused = [r for r in replies if r.error is not None]
    assert refused, "a 700-micro cap must refuse some of six requests"
    err = refused[0].error
    assert err is not None and err.code == "budget_exceeded"
    assert err.remaining_micros is not None and err.requested_micros is not None
    assert err.requested_micros > err.remaining_micros >= 0


async def test_http_budget_refusal_is_402_with_figures(http_url: str, token_for) -> None:
    token = token_for("tight")
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 64}
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 402
        err = (await r.json())["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert err["requested_micros"] > err["remaining_micros"]


async def test_models_list_shows_only_what_the_session_may_use(http_url: str, token_for) -> None:
    async with aiohttp.ClientSession() as s:
        seen = {}
        for team in ("gamma", "bravo"):
            async with s.get(f"{http_url}/v1/models", headers={"Authorization": f"Bearer {token_for(team)}"}) as r:
                assert r.status == 200
                seen[team] = {m["id"] for m in (await r.json())["data"]}
        async with s.get(f"{http_url}/v1/models", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "token_malformed"
    assert seen["gamma"] == {"enclave-tiny", "analyst-large", "enclave-tiny-ha", "enclave-tiny-duo", "enclave-tiny-hang",
                             "enclave-tiny-down", "enclave-tiny-solo", "claude-local", "converse-local",
                             "enclave-tiny-orphan"}
    assert seen["bravo"] == {"enclave-tiny"}
