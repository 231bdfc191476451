"""Issue 10 item 6: tokens reach the caller as the model server produces them, by both entries; the
stream records the outcome and the usage (counted when the server reports none); a caller that
hangs up is recorded and charged for what was generated."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import nats
import openai
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, StreamChunk, SubmitRequest
from enclave_gateway.services import catalog
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import stream_events, wait_for_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _body(max_tokens: int, include_usage: bool = True, model: str = "enclave-tiny") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": include_usage}}


async def _events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of a server-sent event stream, in order."""
    out = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            out.append(line[6:].strip())
    return out


async def test_http_stream_sends_tokens_as_they_come_then_usage_counted_by_the_gateway(
        admin: Client, http_url: str, token_for) -> None:
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as http, http.post(f"{http_url}/v1/chat/completions", json=_body(12),
                                                          headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        payloads = await _events(resp)
    assert payloads[-1] == b"[DONE]"
    chunks = [msgspec.json.decode(p) for p in payloads[:-1]]
    rid = chunks[0]["id"].removeprefix("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]
                and "content" in c["choices"][0]["delta"]]
    assert len(contents) >= 2, "the answer came in one piece, not token by token"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and not any(finish[:-1])
    # llama-cpp-python's server reports no usage when streaming: the gateway counted it and says so
    done = await wait_for_event(admin, rid, "InvocationCompleted")
    assert done["streamed"] is True and done["usage_reported"] is False
    assert done["content"] == "".join(contents) and done["completion_tokens"] == 12
    bound = catalog.prompt_tokens_bound(ChatBody(model="x", messages=(ChatMessage(role="user", content="tell me"),)))
    assert chunks[-1]["usage"]["prompt_tokens"] == done["prompt_tokens"] == bound
    settled = await wait_for_event(admin, rid, "BudgetSettled")
    assert (settled["completion_tokens"], settled["prompt_tokens"]) == (12, bound)
    assert await wait_for_event(admin, rid, "ResponseDelivered")


async def test_the_first_token_reaches_the_caller_before_the_model_has_finished(
        admin: Client, http_url: str, token_for) -> None:
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as http, http.post(f"{http_url}/v1/chat/completions", json=_body(400),
                                                          headers=headers) as resp:
        async for line in resp.content:
            body = msgspec.json.decode(line[6:]) if line.startswith(b"data: {") else {}
            if body and body["choices"] and body["choices"][0]["delta"].get("content"):
                rid = body["id"].removeprefix("chatcmpl-")
                break
        # ~400 tokens take the engine a few hundred ms; one token in, the outcome is not yet a fact
        early = [b["type"] for _, b in await stream_events(admin, rid, subject="gw.evt.invocation.>",
                                                           timeout_s=0.05)]
        rest = await _events(resp)
    assert "InvocationCompleted" not in early and rest[-1] == b"[DONE]"
    done = await wait_for_event(admin, rid, "InvocationCompleted")
    assert done["completion_tokens"] == 400 and done["streamed"] is True


async def test_the_official_openai_client_streams_through_the_edge(admin: Client, http_url: str, token_for) -> None:
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("gamma"), max_retries=0)
    stream = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=10, stream=True, stream_options={"include_usage": True})
    pieces, usage, served = [], None, set()
    async for chunk in stream:
        served.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) >= 2 and usage is not None and usage.completion_tokens == 10
    assert served == {"enclave-tiny"}  # the alias was served by the model it names
    # without include_usage no usage chunk is sent
    plain = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, stream=True)
    assert [c.usage async for c in plain if c.usage is not None] == []


async def test_a_refusal_before_the_first_token_is_a_plain_http_error(http_url: str, token_for) -> None:
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("bravo"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await oai.chat.completions.create(model="analyst-large", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, stream=True)
    assert err.value.body["code"] == "model_forbidden"  # type: ignore[index]


async def test_nats_callers_get_chunks_on_their_own_chunk_subject_then_the_reply(
        client: Client, stack: WorkerSettings, token_for) -> None:
    inbox = client.new_inbox()
    chunk_subject = subjects.chunks_of(inbox)
    assert chunk_subject is not None and chunk_subject.startswith("_CHUNK_app.tester.")
    chunks = await client.subscribe(chunk_subject)
    replies = await client.subscribe(inbox)
    # another application tries to read them: the server refuses it, and it gets nothing
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    from enclave_gateway.services.credentials import load_creds
    creds = load_creds(stack.creds_dir, "app.other")
    assert creds is not None
    other = await nats.connect(stack.nats_url, nkeys_seed=creds.seed_file, inbox_prefix=creds.inbox_prefix,
                               error_cb=on_error, allow_reconnect=False)
    try:
        spy = await other.subscribe("_CHUNK_app.tester.>")
        await other.flush()
        chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="hi"),), max_tokens=9,
                        temperature=0.0, stream=True)
        await client.publish(subjects.submit("tester"), codec.encode(SubmitRequest(token=token_for("gamma"),
                                                                                    chat=chat)), reply=inbox)
        reply = codec.decode_reply((await replies.next_msg(timeout=30)).data)
        got: list[StreamChunk] = []
        while True:
            try:
                got.append(codec.decode_chunk((await chunks.next_msg(timeout=0.5)).data))
            except nats.errors.TimeoutError:
                break
        assert reply.completion is not None and reply.completion.usage.completion_tokens == 9
        assert [c.index for c in got] == list(range(9)) and {c.request_id for c in got} == {reply.request_id}
        assert "".join(c.content for c in got) == reply.completion.content
        with pytest.raises(nats.errors.TimeoutError):
            await spy.next_msg(timeout=0.2)
        assert any('permissions violation for subscription to "_chunk_app.tester.>"' in e for e in errors)
    finally:
        await other.close()
        await chunks.unsubscribe()
        await replies.unsubscribe()


async def test_a_caller_that_hangs_up_mid_stream_is_recorded_and_charged_for_what_was_generated(
        admin: Client, http_url: str, token_for) -> None:
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{http_url}/v1/chat/completions", json=_body(300), headers=headers)
        async for line in resp.content:
            body = msgspec.json.decode(line[6:]) if line.startswith(b"data: {") else {}
            if body and body["choices"] and body["choices"][0]["delta"].get("content"):
                rid = body["id"].removeprefix("chatcmpl-")
                break
        resp.close()  # hang up after the first token
    gone = await wait_for_event(admin, rid, "ResponseUndelivered", timeout_s=20)
    assert gone["reason"] == "caller_gone"
    done = await wait_for_event(admin, rid, "InvocationCompleted")
    settled = await wait_for_event(admin, rid, "BudgetSettled")
    assert settled["completion_tokens"] == done["completion_tokens"] > 0
    assert 0 < int(settled["charged_micros"]) <= int(settled["reserved_amount_micros"])  # type: ignore[call-overload]
    delivered = [b for _, b in await stream_events(admin, rid, subject=subjects.response_delivered())]
    assert delivered == []  # never recorded as delivered


async def test_streams_of_concurrent_callers_do_not_mix(http_url: str, token_for) -> None:
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}

    async def one(text: str) -> tuple[str, str]:
        body = {**_body(8, include_usage=False), "messages": [{"role": "user", "content": text}]}
        async with aiohttp.ClientSession() as http, http.post(f"{http_url}/v1/chat/completions", json=body,
                                                              headers=headers) as resp:
            chunks = [msgspec.json.decode(p) for p in (await _events(resp))[:-1]]
        ids = {c["id"] for c in chunks}
        assert len(ids) == 1
        return ids.pop(), "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    results = await asyncio.gather(*(one(f"prompt number {i}") for i in range(6)))
    assert len({rid for rid, _ in results}) == 6 and all(text for _, text in results), results


async def test_an_answer_cut_short_by_the_deadline_is_what_the_caller_got_and_is_charged(
        admin: Client, client: Client, http_url: str, token_for) -> None:
    """Found by a hostile review: a caller that set a short deadline on a streamed request got tokens
    for free (the reservation was released). A server that streams three tokens then stalls: the
    caller keeps them, hears that the answer broke off, and the team pays for them."""
    from aiohttp import web

    from .conftest import HANG_PORT

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one", " two", " three"):
            await resp.write(b'data: {"choices":[{"delta":{"content":"' + word.encode() + b'"}}]}\n\n')
        await asyncio.sleep(3600)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # its handlers stall by design
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", HANG_PORT).start()
    inbox = client.new_inbox()
    chunk_subject = subjects.chunks_of(inbox)
    assert chunk_subject is not None
    chunks, replies = await client.subscribe(chunk_subject), await client.subscribe(inbox)
    try:
        chat = ChatBody(model="enclave-tiny-hang", messages=(ChatMessage(role="user", content="go"),), max_tokens=40,
                        stream=True)
        await client.publish(subjects.submit("tester"), codec.encode(SubmitRequest(
            token=token_for("gamma"), chat=chat, timeout_s=1.5)), reply=inbox)
        reply = codec.decode_reply((await replies.next_msg(timeout=30)).data)
        got = [codec.decode_chunk(m.data).content for m in [await chunks.next_msg(timeout=1) for _ in range(3)]]
        oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("gamma"), max_retries=0)
        pieces = []
        with pytest.raises(openai.APIError, match="broke off after"):
            stream = await oai.chat.completions.create(
                model="enclave-tiny-hang", messages=[{"role": "user", "content": "go"}], max_tokens=40, stream=True,
                extra_headers={"X-Request-Timeout": "1.5"})
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    pieces.append(c.choices[0].delta.content)
    finally:
        await chunks.unsubscribe()
        await replies.unsubscribe()
        await runner.cleanup()
    assert "".join(got) == "".join(pieces) == "one two three"
    assert reply.completion is not None and reply.completion.finish_reason == "interrupted"
    assert reply.completion.content == "one two three"
    done = await wait_for_event(admin, reply.request_id, "InvocationCompleted")
    assert done["broken_off"].startswith("timeout") and done["usage_reported"] is False  # type: ignore[union-attr]
    settled = await wait_for_event(admin, reply.request_id, "BudgetSettled")
    assert settled["completion_tokens"] == len("one two three") and int(settled["charged_micros"]) > 0  # type: ignore[call-overload]
    kinds = [b["type"] for _, b in await stream_events(admin, reply.request_id)]
    assert "BudgetReleased" not in kinds and "InvocationFailed" not in kinds
