"""Issue 11 item 7 (in part): every hostile input a tester sent gets an OpenAI-shaped 4xx with our
code, a record in the stream, and nothing of the prompt in a reply it should not be in."""

from __future__ import annotations

import aiohttp
import pytest
from enclave_gateway.schemas import codec, subjects
from nats.aio.client import Client

from .conftest import stream_events

pytestmark = pytest.mark.asyncio(loop_scope="session")
SECRET_TEXT = "the-prompt-must-not-leak-7731"


def _chat(**extra: object) -> dict[str, object]:
    return {"model": "enclave-tiny", "messages": [{"role": "user", "content": SECRET_TEXT}], "max_tokens": 2,
            **extra}


async def _post(http_url: str, body: bytes | dict[str, object], headers: dict[str, str] | None = None,
                raw_headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, object], str]:
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, object] = {"json": body} if isinstance(body, dict) else {"data": body}
        async with http.post(f"{http_url}/v1/chat/completions", headers=headers or {}, **kwargs) as resp:  # type: ignore[arg-type]
            text = await resp.text()
            assert resp.content_type == "application/json", (resp.status, text[:200])
            return resp.status, await resp.json(), text


@pytest.mark.parametrize("body, why", [
    (b"[" * 10_000 + b"]" * 10_000, "expected `object`"),
    (b'{"model":"enclave-tiny","messages":[],"metadata":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested"),
    (b'{"model":"enclave-tiny","messages":[{"role":"user","content":"\xff\xfe"}]}', "utf-8"),
    (_chat(messages=[{"role": "", "content": "x"}]), "role"),
    (_chat(n=3), "n"),
    (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (_chat(functions=[{"name": "f"}]), "functions"),
    (_chat(temperature=-5), "temperature"),
    (_chat(temperature=2.5), "temperature"),
    (_chat(model="m" * 10_000), "model"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "text"),
    # fields the gateway does not honour are refused by name, never silently ignored (issue 11 item 8)
    (_chat(response_format={"type": "json_object"}), "response_format"),
    (_chat(top_p=0.2), "top_p"),
    (_chat(stop=["\n"]), "stop"),
    (_chat(logprobs=True), "logprobs"),
    (_chat(top_k=5), "top_k"),  # a field OpenAI does not have either: refused, not ignored
    (_chat(top_p=True), "top_p"),  # not the neutral 1: True == 1 in Python, not in the contract
    (_chat(max_completion_tokens=0), "max_tokens"),
    (_chat(messages=[{"role": "user", "content": "x", "name": "alice"}]), "name"),
    (_chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "tool_calls"),
])
async def test_a_hostile_body_is_an_openai_shaped_400_and_a_record(admin: Client, http_url: str, token_for,
                                                                   body: bytes | dict[str, object], why: str) -> None:
    status, answer, text = await _post(http_url, body, {"Authorization": f"Bearer {token_for('gamma')}"})
    assert status == 400 and answer["error"]["code"] == "invalid_request", answer  # type: ignore[index]
    assert why in str(answer["error"]["message"]).lower()  # type: ignore[index]
    assert SECRET_TEXT not in text and "m" * 1000 not in text
    rejected = [b for _, b in await stream_events(admin, subject=subjects.message_rejected(), timeout_s=0.3)
                if b.get("subject") == "http:/v1/chat/completions" and why in str(b.get("detail", "")).lower()]
    assert rejected, "no record in the stream"
    assert all(SECRET_TEXT not in str(b) for b in rejected)


async def test_the_neutral_values_client_libraries_send_by_default_are_accepted(http_url: str, token_for) -> None:
    neutral = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "stop": None,
               "logprobs": False, "response_format": {"type": "text"}, "user": "u-1", "n": 1, "stream": None,
               "tool_choice": "none", "store": False, "metadata": {"app": "x"}}
    status, answer, _ = await _post(http_url, _chat(**neutral), {"Authorization": f"Bearer {token_for('gamma')}"})
    assert status == 200, answer


async def test_text_content_parts_are_accepted_as_openai_does(http_url: str, token_for) -> None:
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    status, answer, _ = await _post(http_url, _chat(messages=[{"role": "user", "content": parts}]),
                                    {"Authorization": f"Bearer {token_for('gamma')}"})
    assert status == 200 and answer["choices"][0]["message"]["content"], answer  # type: ignore[index]


@pytest.mark.parametrize("header, value, code", [
    ("X-Input-Classification", "SECRET//\u017fI", "label_invalid"),  # the long s upper-cases to S: ASCII only
    ("X-Input-Classification", "SECRET\u00ff", "label_invalid"),
    ("Authorization", "Bearer abc\u00ff.def.ghi", "token_malformed"),
])
async def test_a_hostile_header_is_refused_with_its_code(http_url: str, token_for, header: str, value: str,
                                                         code: str) -> None:
    headers = {"Authorization": f"Bearer {token_for('gamma')}", "X-Output-Classification": "SECRET//SI"}
    headers[header] = value
    async with aiohttp.ClientSession() as http, http.post(
            f"{http_url}/v1/chat/completions", json=_chat(),
            # the bytes on the wire are UTF-8 (aiohttp's client writes header strings as latin-1)
            headers={k: v.encode().decode("latin-1") for k, v in headers.items()}) as resp:
        answer = await resp.json()
    assert resp.status in (400, 401) and answer["error"]["code"] == code, answer


async def test_two_output_labels_are_ambiguous_and_refused(http_url: str, token_for) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Authorization", f"Bearer {token_for('gamma')}"),
                           ("X-Output-Classification", "SECRET//SI"), ("X-Output-Classification", "UNCLASSIFIED")])
    async with aiohttp.ClientSession() as http, http.post(f"{http_url}/v1/chat/completions", json=_chat(),
                                                          headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == 400 and answer["error"]["code"] == "invalid_request" and "once" in answer["error"]["message"]


async def test_unknown_paths_and_methods_answer_in_openai_shape(http_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{http_url}/v1/nothing") as missing:
            assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
        async with http.get(f"{http_url}/v1/chat/completions") as wrong:
            assert wrong.status == 405 and (await wrong.json())["error"]["code"] == "method_not_allowed"


async def test_hostile_bytes_on_gw_submit_get_a_clear_error_without_the_prompt(client: Client) -> None:
    for data in (b"[" * 10_000 + b"]" * 10_000, b'{"token":"x","chat":{"model":"m","messages":[{"role":"user",'
                                                b'"content":"' + SECRET_TEXT.encode() + b'\xff"}]}}'):
        reply = codec.decode_reply((await client.request(subjects.submit("tester"), data, timeout=10)).data)
        assert reply.error is not None and reply.error.code == "invalid_request"
        assert SECRET_TEXT not in reply.error.message


async def test_a_prompt_longer_than_the_context_is_a_400_not_a_model_failure(http_url: str, token_for) -> None:
    status, answer, _ = await _post(http_url, _chat(messages=[{"role": "user", "content": "o " * 2000}],
                                                    max_tokens=8), {"Authorization": f"Bearer {token_for('gamma')}"})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer  # type: ignore[index]


async def test_a_token_that_lives_longer_than_policy_allows_is_refused(http_url: str, keys_dir) -> None:
    """A token with `exp` 10^30 was accepted; the shipped policy bounds a session at a day
    (issuers.jwks.json `max_token_lifetime_s`; a policy recorded without it replays as decided)."""
    import time

    from enclave_gateway import issuer

    forever = issuer.issue(keys_dir, subject="eve", team="gamma", ttl_s=10**12, now=int(time.time()))
    status, answer, _ = await _post(http_url, _chat(), {"Authorization": f"Bearer {forever}"})
    assert status == 401 and answer["error"]["code"] == "token_malformed"  # type: ignore[index]
    assert "lifetime" in str(answer["error"]["message"])  # type: ignore[index]


async def test_answers_carry_the_fields_openais_schema_requires(http_url: str, token_for) -> None:
    """Issue 11 item 8 (in part): `choices[].logprobs` and `message.refusal` are required (nullable)
    in OpenAI's response schema, and were missing; a streamed chunk's choices carry `logprobs` too."""
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    status, answer, _ = await _post(http_url, _chat(messages=[{"role": "developer", "content": "be brief"},
                                                              {"role": "user", "content": "hi"}]), headers)
    choice = answer["choices"][0]  # type: ignore[index]
    assert status == 200 and "logprobs" in choice and choice["logprobs"] is None
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    async with aiohttp.ClientSession() as http, http.post(f"{http_url}/v1/chat/completions",
                                                          json=_chat(stream=True), headers=headers) as resp:
        chunks = [line[6:] for line in (await resp.read()).split(b"\n") if line.startswith(b"data: {")]
    import json

    assert chunks and all("logprobs" in c for body in chunks for c in json.loads(body)["choices"])


async def _raw(http_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Bytes sent as they are: the HTTP client libraries refuse to write what a hostile caller would."""
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(http_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        head, _, body = (await asyncio.wait_for(reader.read(-1), 10)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("request_bytes, why", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + SECRET_TEXT.encode() * 400 + b"\r\n\r\n",
     "over the limit"),  # 11 KB in one header: aiohttp's parser refuses it before any route sees it
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, SECRET_TEXT.encode()) for i in range(200)) + b"\r\n", "over the limit"),
    (b"POST /v1/chat/" + SECRET_TEXT.encode() + b"\x00 HTTP/1.1\r\nHost: x\r\n\r\n", "not valid http"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-" + SECRET_TEXT.encode() + b" Bad: 1\r\n\r\n",
     "not valid http"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET_TEXT.encode() + b"\r\n\r\n", "not valid http"),
])
async def test_bytes_the_http_parser_refuses_get_an_openai_shaped_400_and_a_record(
        admin: Client, http_url: str, request_bytes: bytes, why: str, caplog: pytest.LogCaptureFixture) -> None:
    """Oversized headers and bytes that are not HTTP were answered by aiohttp's parser in text/plain,
    before any route or middleware ran, left no record, and logged a traceback quoting the bytes."""
    import json
    import logging

    caplog.set_level(logging.DEBUG)

    status, headers, body = await _raw(http_url, request_bytes)
    assert status == 400 and headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error", error
    assert why in error["message"].lower() and SECRET_TEXT not in body.decode("latin-1")
    request_id = headers.get("x-request-id")
    assert request_id, headers
    records = [b for _, b in await stream_events(admin, request_id, subject=subjects.message_rejected(),
                                                 timeout_s=0.3)]
    assert len(records) == 1 and records[0]["subject"] == "http:unparsed", records
    assert SECRET_TEXT not in str(records[0])
    assert "HTTP 400" in caplog.text and SECRET_TEXT not in caplog.text


async def test_a_parser_refusal_that_cannot_be_recorded_is_a_503_not_a_400() -> None:
    """AU-5 on the parser's path: the refusal is recorded before it is sent, and one that could not be
    stored is told as such (the edge's `reject` answers audit_unavailable then)."""
    from aiohttp import web
    from aiohttp.http_exceptions import LineTooLong
    from enclave_gateway.services.edge import decider, unparsed

    recorded: list[tuple[str, str]] = []

    async def broker_down(code: str, detail: str) -> object:
        recorded.append((code, detail))
        return decider.error_reply("r-1", "audit_unavailable", "the audit stream could not record it")

    runner = unparsed.OpenAIShapedRunner(web.Application(), broker_down, access_log=None)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        status, headers, body = await _raw(f"http://127.0.0.1:{port}",
                                           b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    finally:
        await runner.cleanup()
    assert recorded == [("invalid_request", unparsed.detail(LineTooLong("header", 8190)))]
    assert status == 503 and b'"audit_unavailable"' in body and headers["x-request-id"] == "r-1"
