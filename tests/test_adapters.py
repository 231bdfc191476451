"""Issue 10 item 8: the Anthropic Messages and Bedrock Converse adapters, for unclassified
deployments: request and answer translation, streaming and usage included, tested against local
servers that speak those protocols' shapes (no internet); refused in enclave mode."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import msgspec
import openai
import pytest
from aiohttp import web
from enclave_gateway import runtime
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import InvocationCompleted, InvocationFailed, RouteSelected
from enclave_gateway.services.invoker import adapters, decider, hosted
from enclave_gateway.services.policy import PolicyError
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import ANTHROPIC_PORT, BEDROCK_PORT, wait_for_event
from .samples import SAMPLES_BY_NAME

CHAT = ChatBody(model="m", messages=(ChatMessage(role="system", content="Be brief."),
                                     ChatMessage(role="user", content="hi"),
                                     ChatMessage(role="assistant", content="hello"),
                                     ChatMessage(role="user", content="again")), temperature=0.5)


def _route(protocol: str, stream: bool = False) -> RouteSelected:
    r = SAMPLES_BY_NAME["RouteSelected"]
    assert isinstance(r, RouteSelected)
    return msgspec.structs.replace(r, protocol=protocol, model_id="claude-x",
                                   chat=msgspec.structs.replace(CHAT, stream=stream))


def test_anthropic_requests_carry_the_system_apart_and_the_reserved_bound() -> None:
    path, body = decider.request_for(_route("anthropic"))
    sent = json.loads(body)
    assert path == "/v1/messages" and sent["system"] == "Be brief." and sent["max_tokens"] == 8
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"] and "stream" not in sent
    answer = decider.whole_answer("anthropic", b'{"content":[{"type":"text","text":"Hi "},{"type":"text","text":"you"}]'
                                              b',"stop_reason":"max_tokens","usage":{"input_tokens":12,"output_tokens":3}}')
    assert (answer.content, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == (
        "Hi you", "length", 12, 3)


def test_bedrock_requests_and_answers_are_converse_shaped() -> None:
    path, body = decider.request_for(_route("bedrock", stream=True))
    sent = json.loads(body)
    assert path == "/model/claude-x/converse-stream" and sent["system"] == [{"text": "Be brief."}]
    assert sent["inferenceConfig"] == {"maxTokens": 8, "temperature": 0.5}
    assert sent["messages"][0] == {"role": "user", "content": [{"text": "hi"}]}
    answer = decider.whole_answer("bedrock", b'{"output":{"message":{"role":"assistant","content":[{"text":"ok"}]}},'
                                            b'"stopReason":"end_turn","usage":{"inputTokens":9,"outputTokens":1}}')
    assert (answer.content, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == ("ok", "stop", 9, 1)


ANTHROPIC_STREAM = [
    b"event: message_start", b'data: {"type":"message_start","message":{"usage":{"input_tokens":12,"output_tokens":1}}}',
    b"", b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}', b"",
    b'data: {"type":"ping"}', b"",
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}', b"",
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}', b"",
    b'data: {"type":"content_block_stop","index":0}', b"",
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}', b"",
    b'data: {"type":"message_stop"}', b"",
]


def test_an_anthropic_stream_gives_its_text_as_it_comes_and_its_usage() -> None:
    reader = adapters.reader_for("anthropic")
    sent = [t for i, line in enumerate(ANTHROPIC_STREAM) if (t := reader.feed(line, float(i))) is not None]
    assert sent == ["Hi", " there"] and reader.done
    [done] = decider.decide(_route("anthropic", True), reader.outcome(5.0), "pv",
                            SAMPLES_BY_NAME["RouteSelected"].occurred_at)
    assert isinstance(done, InvocationCompleted) and done.usage_reported
    assert (done.content, done.prompt_tokens, done.completion_tokens, done.finish_reason) == ("Hi there", 12, 2, "stop")
    broken = adapters.reader_for("anthropic")
    broken.feed(ANTHROPIC_STREAM[7], 1.0)
    with pytest.raises(decider.StreamBroken, match="overloaded"):
        broken.feed(b'data: {"type":"error","error":{"type":"overloaded_error","message":"overloaded"}}', 2.0)


def frame(event_type: str, payload: dict[str, object], message_type: str = "event") -> bytes:
    """One AWS event-stream frame (prelude, its CRC, string headers, payload, message CRC)."""
    headers = b""
    kind = ":event-type" if message_type == "event" else ":exception-type"
    for name, value in ((kind, event_type), (":content-type", "application/json"), (":message-type", message_type)):
        headers += bytes([len(name)]) + name.encode() + b"\x07" + len(value).to_bytes(2, "big") + value.encode()
    body = json.dumps(payload).encode()
    prelude = (12 + len(headers) + len(body) + 4).to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + headers + body
    return message + zlib.crc32(message).to_bytes(4, "big")


BEDROCK_STREAM = [frame("messageStart", {"role": "assistant"}),
                  frame("contentBlockDelta", {"delta": {"text": "Con"}, "contentBlockIndex": 0}),
                  frame("contentBlockDelta", {"delta": {"text": "verse"}, "contentBlockIndex": 0}),
                  frame("contentBlockStop", {"contentBlockIndex": 0}),
                  frame("messageStop", {"stopReason": "max_tokens"}),
                  frame("metadata", {"usage": {"inputTokens": 9, "outputTokens": 2, "totalTokens": 11},
                                     "metrics": {"latencyMs": 5}})]


def test_a_bedrock_event_stream_is_read_frame_by_frame_with_its_crcs_checked() -> None:
    reader = adapters.BedrockStreamReader()
    buffer, sent = hosted.frame_buffer(), []
    data = b"".join(BEDROCK_STREAM)
    for cut in range(0, len(data), 7):  # frames split anywhere across reads
        for event_type, message_type, payload in hosted.frames(data[cut:cut + 7], buffer):
            if (text := reader.feed_event(event_type, message_type, payload, 1.0)) is not None:
                sent.append(text)
    assert sent == ["Con", "verse"] and reader.done
    outcome = reader.outcome(3.0)
    assert (outcome.content, outcome.finish_reason, outcome.usage) == ("Converse", "length", outcome.usage)
    assert outcome.usage is not None and (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (9, 2)
    corrupt = bytearray(BEDROCK_STREAM[1])
    corrupt[-6] ^= 0xFF
    with pytest.raises(Exception, match="(?i)crc|checksum"):
        hosted.frames(bytes(corrupt), hosted.frame_buffer())
    with pytest.raises(decider.StreamBroken, match="throttlingException"):
        adapters.BedrockStreamReader().feed_event("throttlingException", "exception", b'{"message":"slow down"}', 1.0)


def test_hosted_apis_need_their_keys_and_bedrock_calls_are_signed() -> None:
    with pytest.raises(hosted.NoCredentials, match="ANTHROPIC_API_KEY"):
        hosted.upstream(_route("anthropic"), "http://h", env={})
    up = hosted.upstream(_route("anthropic"), "http://h/", env={"ANTHROPIC_API_KEY": "k1"})
    assert up.url == "http://h/v1/messages" and up.headers["x-api-key"] == "k1"
    signed = hosted.upstream(_route("bedrock"), "https://bedrock-runtime.eu-west-3.amazonaws.com",
                             env={"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"})
    auth = signed.headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/") and "/eu-west-3/bedrock/aws4_request" in auth


def test_enclave_mode_refuses_a_catalog_that_names_a_hosted_api(tmp_path: Path, policy_dir: Path,
                                                                settings: WorkerSettings) -> None:
    enclave = msgspec.structs.replace(settings, egress_allow=("127.0.0.0/8",))
    with pytest.raises(PolicyError, match="claude-local \\(anthropic\\)"):
        runtime.refuse_hosted_in_enclave(enclave, policy_dir)
    runtime.refuse_hosted_in_enclave(settings, policy_dir)  # outside enclave mode the same catalog is fine


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.asyncio(loop_scope="session")
async def test_both_adapters_answer_through_the_edge_whole_and_streamed(
        admin: Client, http_url: str, token_for, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-local-test")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("AWS_REGION", "us-gov-west-1")
    seen: list[dict[str, str]] = []

    async def messages(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        sent = await request.json()
        if not sent.get("stream"):
            return web.json_response({"content": [{"type": "text", "text": f"{sent['model']} says hi"}],
                                      "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 3}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for line in ANTHROPIC_STREAM:
            await resp.write(line + b"\n")
        return resp

    async def converse(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if request.match_info["action"] == "converse":
            return web.json_response({"output": {"message": {"role": "assistant", "content": [{"text": "ok"}]}},
                                      "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        for f in BEDROCK_STREAM:
            await resp.write(f)
        return resp

    anthropic_app, bedrock_app = web.Application(), web.Application()
    anthropic_app.router.add_post("/v1/messages", messages)
    bedrock_app.router.add_post("/model/{model}/{action}", converse)
    runners = [await _serve(anthropic_app, ANTHROPIC_PORT), await _serve(bedrock_app, BEDROCK_PORT)]
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("gamma"), max_retries=0)
    try:
        whole = await oai.chat.completions.create(model="claude-local", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=8)
        assert whole.choices[0].message.content == "claude-local says hi" and whole.usage is not None
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (7, 3)
        pieces, usage = [], None
        async for c in await oai.chat.completions.create(
                model="claude-local", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
                stream_options={"include_usage": True}):
            pieces += [c.choices[0].delta.content] if c.choices and c.choices[0].delta.content else []
            usage = c.usage or usage
        assert pieces == ["Hi", " there"] and usage is not None and usage.completion_tokens == 2
        converse_whole = await oai.chat.completions.create(
            model="converse-local", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert converse_whole.choices[0].message.content == "ok"
        streamed = [c.choices[0].delta.content async for c in await oai.chat.completions.create(
            model="converse-local", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
            if c.choices and c.choices[0].delta.content]
        assert streamed == ["Con", "verse"]
        rid = converse_whole.id.removeprefix("chatcmpl-")
    finally:
        for runner in runners:
            await runner.cleanup()
    assert seen[0]["x-api-key"] == "sk-local-test" and seen[0]["anthropic-version"] == adapters.ANTHROPIC_VERSION
    assert seen[2]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDLOCAL/")
    assert "/us-gov-west-1/bedrock/aws4_request" in seen[2]["Authorization"]
    done = await wait_for_event(admin, rid, "InvocationCompleted")
    settled = await wait_for_event(admin, rid, "BudgetSettled")
    assert (done["prompt_tokens"], done["completion_tokens"]) == (5, 1) == (settled["prompt_tokens"],
                                                                            settled["completion_tokens"])


def test_usage_no_audit_column_can_hold_is_a_bad_response_and_never_stops_the_auditor() -> None:
    """Found by a hostile review: usage of 10**20 from a server went through and stopped the
    auditor (its int64 columns), which took the gateway down, again after every restart."""
    huge = b'{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":100000000000000000000,"output_tokens":1}}'
    [failed] = decider.decide(_route("anthropic"), decider.CallAnswered(status=200, body=huge, latency_ms=1.0), "pv",
                              SAMPLES_BY_NAME["RouteSelected"].occurred_at)
    assert isinstance(failed, InvocationFailed) and failed.error == "bad_response"
    from enclave_gateway.schemas import codec, subjects
    from enclave_gateway.services.auditor import decider as auditor

    forged = msgspec.structs.replace(SAMPLES_BY_NAME["InvocationCompleted"], prompt_tokens=10**20)
    row, _ = auditor.row_for(auditor.initial_state(), 1, subjects.for_event(forged), codec.encode(forged),
                             forged.occurred_at, b"k" * 32)
    assert row.prompt_tokens is None and "prompt_tokens out of the audit's range" in (row.detail or "")


@pytest.mark.asyncio(loop_scope="session")
async def test_no_key_or_signature_ever_reaches_the_stream_and_a_route_cannot_claim_a_hosted_protocol(
        admin: Client, http_url: str, token_for, monkeypatch: pytest.MonkeyPatch, stack) -> None:
    """Found by a hostile review: (1) aiohttp's repr of a failed call, recorded as the failure's
    detail, carried the request's headers: the API key and the SigV4 signature went into the audit
    trail; (2) the invoker chose which keys to send by the route's `protocol`, so a forged route
    sent them to a plain model server. Now keys go only to endpoints the deployment configures as
    that API, and no failure detail carries them, even from a server echoing what it was sent."""
    import asyncio

    from enclave_gateway.schemas import subjects
    from enclave_gateway.services import bus

    from .conftest import HANG_PORT

    key, secret = "sk-ant-NEVER-IN-THE-STREAM-1", "AWS-SECRET-NEVER-IN-THE-STREAM-2"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNEVERINSTREAM")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    heard: list[bytes] = []

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heard.append(head)
        echo = head.replace(b"\r\n", b" ")  # what a hostile or debugging server might send back
        writer.write(b"HTTP/1.1 2000 OK\r\n\r\n" if len(heard) % 2 else
                     b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(echo) + echo)
        await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(broken, "127.0.0.1", port) for port in (ANTHROPIC_PORT, BEDROCK_PORT)]
    plain = await asyncio.start_server(broken, "127.0.0.1", HANG_PORT)
    oai = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key=token_for("gamma"), max_retries=0)
    try:
        for model in ("claude-local", "converse-local"):
            with pytest.raises(openai.APIStatusError):
                await oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=4)
        assert any(key.encode() in h for h in heard) and any(b"AWS4-HMAC-SHA256" in h for h in heard)
        # a route forged to claim the anthropic protocol for a plain model server's endpoint
        hang = SAMPLES_BY_NAME["RouteSelected"]
        assert isinstance(hang, RouteSelected)
        rid = "f" * 32
        forged = msgspec.structs.replace(hang, event_id=f"{rid}:route", request_id=rid, model_id="enclave-tiny-hang",
                                         endpoint="hang-node", protocol="anthropic", attempt=1, tried=(),
                                         deadline_at=None, not_before=None, causation_id=None, causation_seq=None)
        heard.clear()
        router = await bus.connect(stack, "router")  # signed as the router, which owns routes
        try:
            await bus.publish(router.jetstream(), forged)
        finally:
            await router.close()
        failed = await wait_for_event(admin, rid, "InvocationFailed")
        assert failed["error"] == "protocol_mismatch" and heard == []  # nothing was sent to it at all
    finally:
        for server in (*servers, plain):
            server.close()
    from enclave_gateway import runtime as rt
    await rt.wait_audited(admin, 60)
    stored = await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")
    leaks = [seq for data, _, seq in stored if key.encode() in data or secret.encode() in data
             or b"AWS4-HMAC-SHA256" in data]
    assert leaks == [], [data.decode()[300:900] for data, _, seq in stored if seq in leaks]  # read as bytes
