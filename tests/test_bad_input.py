"""Bad input never crashes a worker and never vanishes: an error event in the stream and a clear
error to the caller, by both entries (issue: walking skeleton, item 8)."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import nats
import pytest
from enclave_gateway.issuer import issue
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import RouteSelected
from nats.aio.client import Client

from .conftest import poison_exhausts_max_deliver, publish_signed, stream_events, wait_for_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _post(http_url: str, body: bytes, token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", data=body,
                                                   headers=headers) as r:
        return r.status, (await r.json())["error"]


def _chat(model: str = "enclave-tiny", text: str = "hi") -> bytes:
    return (b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 4}'
            % (model.encode(), text.encode()))


async def _rejections_mentioning(admin: Client, needle: str) -> list[dict[str, object]]:
    events = await stream_events(admin, subject=subjects.message_rejected())
    return [b for _, b in events if needle in str(b.get("detail", ""))]


@pytest.mark.parametrize("body, needle", [
    (b'{"model": "enclave-tiny", "messages": [', "truncated"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing required field `model`"),
    (b'{"model": "enclave-tiny", "messages": [{"role": "user"}]}', "missing required field `content`"),
    (b'{"model": "enclave-tiny", "messages": []}', "at least one message"),
])
async def test_http_invalid_body_is_400_with_a_rejection_event(admin: Client, http_url: str, client: Client, token_for,
                                                              body: bytes, needle: str) -> None:
    status, err = await _post(http_url, body, token_for("gamma"))
    assert status == 400 and err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    assert needle.lower() in str(err["message"]).lower()
    assert await _rejections_mentioning(admin, str(err["message"])[:40])


@pytest.mark.parametrize("data, code", [
    (b"not json at all", "invalid_request"),
    (b'{"token": "x"}', "invalid_request"),
    (codec.encode(SubmitRequest(token="x", chat=ChatBody(model="m", messages=()))), "invalid_request"),
])
async def test_nats_invalid_submit_gets_error_reply_and_event(admin: Client, client: Client, data: bytes, code: str) -> None:
    msg = await client.request(subjects.submit("tester"), data, timeout=10)
    reply = codec.decode_reply(msg.data)
    assert reply.error is not None and reply.error.code == code
    rejected = await wait_for_event(admin, reply.request_id, "MessageRejected")
    assert rejected["reason"] == code


async def test_oversized_body_is_413_by_http_and_refused_by_nats(admin: Client, http_url: str, client: Client, token_for,
                                                                 stack) -> None:
    big = "x" * (stack.max_body_bytes + 10)
    status, err = await _post(http_url, _chat(text=big), token_for("gamma"))
    assert status == 413 and err["code"] == "body_too_large"
    assert await _rejections_mentioning(admin, f"over {stack.max_body_bytes} bytes")
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=big),))
    msg = await client.request(subjects.submit("tester"), codec.encode(SubmitRequest(token="t", chat=chat)), timeout=10)
    reply = codec.decode_reply(msg.data)
    assert reply.error is not None and reply.error.code == "body_too_large"
    await wait_for_event(admin, reply.request_id, "MessageRejected")


async def test_unknown_model_is_404_and_denied_by_catalog_rule(admin: Client, http_url: str, client: Client, token_for) -> None:
    status, err = await _post(http_url, _chat(model="gpt-9"), token_for("gamma"))
    assert status == 404 and err["code"] == "model_not_found" and err["rule"] == "catalog"
    denials = await stream_events(admin, subject="gw.evt.request.denied.gamma")
    assert any(b["reason"] == "model_not_found" and b["model"] == "gpt-9" for _, b in denials)


@pytest.mark.parametrize("case", ["missing", "forged", "expired", "garbage"])
async def test_bad_tokens_are_401_with_their_own_code(admin: Client, http_url: str, client: Client, keys_dir, tmp_path,
                                                      case: str) -> None:
    subject = f"probe-{uuid.uuid4().hex[:8]}"
    token, code = {
        "missing": (None, "token_missing"),
        "forged": (issue(tmp_path / "other-keys", subject=subject, team="gamma"), "token_unknown_key"),
        "expired": (issue(keys_dir, subject=subject, team="gamma", ttl_s=60, now=int(time.time()) - 7200),
                    "token_expired"),
        "garbage": ("abc.def", "token_malformed"),
    }[case]
    status, err = await _post(http_url, _chat(), token)
    assert status == 401 and err["code"] == code and err["rule"] == "session-token"
    denials = await stream_events(admin, subject="gw.evt.request.denied._unknown")
    assert any(b["reason"] == code for _, b in denials)


async def test_tampered_signature_with_known_kid_is_refused(http_url: str, token_for) -> None:
    token = token_for("gamma")
    head, payload, sig = token.split(".")
    flipped = sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")
    status, err = await _post(http_url, _chat(), f"{head}.{payload}.{flipped}")
    assert status == 401 and err["code"] == "token_bad_signature"


async def test_garbage_on_an_event_subject_is_rejected_and_the_worker_lives(admin: Client, client: Client, token_for,
                                                                       stack) -> None:
    js = admin.jetstream()  # signed by the edge, which owns the subject: a buggy stage, not a forger
    await publish_signed(js, stack.creds_dir, "edge", subjects.request_submitted(), b"\x00garbage")
    await publish_signed(js, stack.creds_dir, "edge", subjects.request_submitted(), b'{"type": "RequestSubmitted"}')
    deadline = time.monotonic() + 10
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(found) < 2:
        events = await stream_events(admin, subject=subjects.message_rejected())
        found = [b for _, b in events if b.get("stage") == "authz"]
        await asyncio.sleep(0.2)
    assert len(found) >= 2
    assert any("missing required field" in str(b["detail"]) for b in found)
    msg = await client.request(subjects.submit("tester"), codec.encode(SubmitRequest(
        token=token_for("gamma"), chat=ChatBody(model="enclave-tiny", max_tokens=2,
                                                messages=(ChatMessage(role="user", content="still alive?"),)))),
        timeout=30)
    assert codec.decode_reply(msg.data).completion is not None


async def test_a_message_that_keeps_failing_ends_in_request_failed_and_an_error_reply(admin: Client, client: Client,
                                                                                    stack) -> None:
    """A handler that always raises: bounded redelivery, then a terminal RequestFailed, and the caller
    hears exactly once."""
    await poison_exhausts_max_deliver(admin, client, "gamma", stack)


@pytest.mark.parametrize("case", ["missing", "forged", "expired", "garbage"])
async def test_bad_tokens_on_gw_submit_get_the_same_codes(admin: Client, client: Client, keys_dir, tmp_path,
                                                          case: str) -> None:
    token, code = {
        "missing": ("", "token_missing"),
        "forged": (issue(tmp_path / "other-keys", subject="m", team="gamma"), "token_unknown_key"),
        "expired": (issue(keys_dir, subject="e", team="gamma", ttl_s=60, now=int(time.time()) - 7200),
                    "token_expired"),
        "garbage": ("abc.def", "token_malformed"),
    }[case]
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="x"),), max_tokens=2)
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(
        SubmitRequest(token=token, chat=chat)), timeout=30)).data)
    assert reply.error is not None and (reply.error.code, reply.error.rule) == (code, "session-token")
    denied = await wait_for_event(admin, reply.request_id, "RequestDenied")
    assert denied["reason"] == code


@pytest.mark.parametrize("labels, clearance, rule", [
    (("CONFIDENTIAL", "SECRET"), "UNCLASSIFIED", "clearance-dominates-input"),
    (("TOP SECRET//SI", "TOP SECRET//SI"), "TOP SECRET", "accreditation-dominates-input"),
    (("SECRET", "NOT-A-LEVEL"), "SECRET", "label-syntax"),
])
async def test_lattice_denials_on_gw_submit(client: Client, token_for, labels: tuple[str, str], clearance: str,
                                            rule: str) -> None:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="x"),), max_tokens=2)
    cmd = SubmitRequest(token=token_for("gamma", clearance=clearance, compartments=("SI",)), chat=chat,
                        input_label=labels[0], output_label=labels[1])
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(cmd), timeout=30)).data)
    assert reply.error is not None and reply.error.rule == rule
