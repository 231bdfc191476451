"""Issue 4 through the running gateway: write-down refused by both entries and listed as a
violation, policies activated and refused on the stream, and least privilege on the bus."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import nats
import pytest
from enclave_gateway import cli, runtime
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import PolicyActivated
from enclave_gateway.services import bus
from enclave_gateway.services.credentials import load_creds
from enclave_gateway.services.policy.feed import PolicyFeed
from enclave_gateway.services.worker import whole_bundle
from enclave_gateway.violations import list_violations
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from .conftest import wait_for_event
from .samples import SAMPLES_BY_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")
SECRET = {"clearance": "SECRET", "compartments": ("SI",), "caveats": ("NOFORN",)}


def _submit(token: str, inp: str | None, out: str | None, model: str = "enclave-tiny") -> bytes:
    chat = ChatBody(model=model, messages=(ChatMessage(role="user", content="the order of battle"),), max_tokens=4)
    return codec.encode(SubmitRequest(token=token, chat=chat, input_label=inp, output_label=out))


async def _wait_violation(stack, request_id: str, timeout_s: float = 15.0) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    audit = Path(stack.data_dir) / "audit"
    while time.monotonic() < deadline:
        _, rows = list_violations(audit)
        found = [r for r in rows if r[-1] == request_id]
        if found:
            return found[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no violation row for {request_id}")


async def test_write_down_is_refused_by_gw_submit_and_lands_in_the_violations_table(
        admin: Client, client: Client, token_for, stack) -> None:
    token = token_for("gamma", subject="analyst-1", **SECRET)
    ok = codec.decode_reply((await client.request(subjects.submit("tester"), _submit(token, "SECRET//SI", "SECRET//SI"),
                                                  timeout=30)).data)
    assert ok.completion is not None
    reply = codec.decode_reply((await client.request(subjects.submit("tester"), _submit(token, "SECRET//SI", "UNCLASSIFIED"),
                                                     timeout=30)).data)
    assert reply.error is not None and (reply.error.code, reply.error.rule) == ("write_down", "no-write-down")
    denied = await wait_for_event(admin, reply.request_id, "RequestDenied")
    assert denied["input_label"] == "SECRET//SI" and denied["output_label"] == "UNCLASSIFIED"
    row = await _wait_violation(stack, reply.request_id)
    # occurred_at, caller, team, rule, reason, model, clearance, input, output, policy_version, request_id
    assert row[1:6] == ("analyst-1", "gamma", "no-write-down", "write_down", "enclave-tiny")
    assert row[6] == "SECRET//NOFORN/SI" and row[7:9] == ("SECRET//SI", "UNCLASSIFIED")
    assert str(row[9]).startswith("sha256:")


async def test_write_down_is_refused_by_http_with_the_rule(http_url: str, token_for, stack,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    token = token_for("gamma", subject="analyst-2", **SECRET)
    headers = {"Authorization": f"Bearer {token}", "X-Input-Classification": "SECRET//SI//NOFORN",
               "X-Output-Classification": "SECRET//SI"}
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", json=body,
                                                   headers=headers) as r:
        assert r.status == 403
        err = (await r.json())["error"]
    assert (err["code"], err["rule"], err["type"]) == ("write_down", "no-write-down", "permission_error")
    headers["X-Output-Classification"] = "SECRET//SI//NOFORN"
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", json=body,
                                                   headers=headers) as r:
        assert r.status == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert cli.main(["violations", "--rule", "no-write-down", "--since", "2026-01-01", "--json",
                         "--data-dir", stack.data_dir]) == 0
        out = capsys.readouterr().out
        if "analyst-2" in out:
            break
        await asyncio.sleep(0.3)
    rows = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in rows if r["caller"] == "analyst-2"]
    assert mine and all(r["rule"] == "no-write-down" for r in rows)
    assert (mine[0]["input_label"], mine[0]["output_label"]) == ("SECRET//NOFORN/SI", "SECRET//SI")


async def test_clearance_and_accreditation_denials_by_http(http_url: str, token_for) -> None:
    cases = [(token_for("gamma", clearance="CONFIDENTIAL"), "SECRET", "SECRET", "enclave-tiny",
              "clearance-dominates-input"),
             (token_for("gamma", clearance="TOP SECRET", compartments=("SI", "TK")), "TOP SECRET//SI",
              "TOP SECRET//SI", "enclave-tiny", "accreditation-dominates-input"),
             (token_for("gamma"), "SEKRET", "SECRET", "enclave-tiny", "label-syntax")]
    async with aiohttp.ClientSession() as s:
        for token, inp, out, model, rule in cases:
            headers = {"Authorization": f"Bearer {token}", "X-Input-Classification": inp,
                       "X-Output-Classification": out}
            body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            async with s.post(f"{http_url}/v1/chat/completions", json=body, headers=headers) as r:
                err = (await r.json())["error"]
                assert err["rule"] == rule and r.status in (400, 403)


async def test_violations_follow_subject_is_readable_by_the_soc_user_only(client: Client, token_for, stack) -> None:
    soc = await bus.connect(stack, "soc")
    sub = await soc.subscribe("gw.evt.request.denied.>")
    try:
        await client.request(subjects.submit("tester"), _submit(token_for("gamma", **SECRET), "SECRET", "U"), timeout=30)
        msg = await sub.next_msg(timeout=10)
        assert codec.decode_event(msg.data).rule == "no-write-down"  # type: ignore[union-attr]
    finally:
        await soc.close()


async def _raw_app(stack, errors: list[str]) -> Client:  # type: ignore[no-untyped-def]
    creds = load_creds(stack.creds_dir, "app.tester")
    assert creds is not None

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(stack.nats_url, nkeys_seed=creds.seed_file,
                              inbox_prefix=creds.inbox_prefix, error_cb=on_error, allow_reconnect=False)


async def _count(admin: Client, subject: str) -> int:
    info = await admin.jetstream().stream_info(subjects.STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_an_application_cannot_forge_pipeline_events(admin: Client, stack) -> None:
    errors: list[str] = []
    app = await _raw_app(stack, errors)
    try:
        forged_auth = SAMPLES_BY_NAME["RequestAuthorized"]
        forged_budget = SAMPLES_BY_NAME["BudgetReserved"]
        before = (await _count(admin, "gw.evt.request.authorized.>"), await _count(admin, "gw.evt.ledger.>"))
        await app.publish(subjects.for_event(forged_auth), codec.encode(forged_auth))
        await app.publish(subjects.for_event(forged_budget), codec.encode(forged_budget))
        with pytest.raises(nats.errors.TimeoutError):
            await app.jetstream().publish(subjects.for_event(forged_auth), codec.encode(forged_auth), timeout=1)
        sub = await app.subscribe("gw.evt.>")
        await app.flush()
        await asyncio.sleep(0.5)
        assert any("permissions violation for publish" in e and "authorized" in e for e in errors), errors
        assert any("permissions violation for publish" in e and "ledger" in e for e in errors), errors
        assert any("permissions violation for subscription" in e for e in errors), errors
        assert app.is_connected
        after = (await _count(admin, "gw.evt.request.authorized.>"), await _count(admin, "gw.evt.ledger.>"))
        assert after == before
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
    finally:
        await app.close()


async def test_a_service_may_publish_only_what_it_owns(admin: Client, stack) -> None:
    errors: list[str] = []
    creds = load_creds(stack.creds_dir, "authz")
    assert creds is not None

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(stack.nats_url, nkeys_seed=creds.seed_file,
                            inbox_prefix=creds.inbox_prefix, error_cb=on_error, allow_reconnect=False)
    try:
        before = await _count(admin, "gw.evt.ledger.>")
        forged = SAMPLES_BY_NAME["BudgetReserved"]
        await nc.publish(subjects.for_event(forged), codec.encode(forged))
        await nc.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation for publish" in e for e in errors), errors
        assert await _count(admin, "gw.evt.ledger.>") == before
    finally:
        await nc.close()


def _bundle_copy(src: Path, dst: Path, access_extra: str = "", access_drop: str = "") -> Path:
    shutil.copytree(src, dst)
    text = (dst / "access_policy.csv").read_text()
    if access_drop:
        text = "\n".join(line for line in text.splitlines() if line.strip() != access_drop) + "\n"
    (dst / "access_policy.csv").write_text(text + access_extra)
    return dst


async def test_activation_switches_every_replica_and_an_invalid_policy_is_refused(
        admin: Client, client: Client, token_for, stack, tmp_path: Path) -> None:
    original = Path(stack.policy_dir)
    feeds = [PolicyFeed(admin, admin.jetstream(), f"replica-{i}", whole_bundle, stack.policy_signers) for i in range(2)]
    for f in feeds:
        await f.start()
    before = feeds[0].version
    narrowed = _bundle_copy(original, tmp_path / "narrow", access_drop="p, team:gamma, analyst-large")
    try:
        event = await runtime.activate(stack, narrowed, "test")
        await _until(lambda: all(f.version == event.version for f in feeds))
        reply = codec.decode_reply((await client.request(subjects.submit("tester"), _submit(
            token_for("gamma"), None, None, model="analyst-large"), timeout=30)).data)
        assert reply.error is not None and reply.error.rule == "team-model-access"
        denied = await wait_for_event(admin, reply.request_id, "RequestDenied")
        assert denied["policy_version"] == event.version != before

        broken = _bundle_copy(original, tmp_path / "broken", access_drop="p2, no-write-down, m4")
        assert await asyncio.to_thread(cli.main, ["policy", "activate", "--dir", str(broken), "--data-dir", stack.data_dir]) == 1
        active = await runtime.active_policy(stack)
        assert active is not None and active.version == event.version

        forged = PolicyActivated(**{**_envelope("forged"), "policy_version": "sha256:bad"}, version="sha256:bad",
                                 sha256="0" * 64, activated_by="mallory", files={"catalog.toml": "x"})
        await bus.publish(admin.jetstream(), forged)
        await asyncio.sleep(0.5)
        assert all(f.version == event.version for f in feeds)
    finally:
        restored = await runtime.activate(stack, original, "test-restore")
        await _until(lambda: all(f.version == restored.version for f in feeds))
    assert restored.version == before


def _envelope(name: str) -> dict[str, object]:
    return {"event_id": f"{name}-{uuid.uuid4().hex}:activate", "request_id": name,
            "occurred_at": datetime.now(UTC), "policy_version": "x"}


async def _until(cond, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_policy_activation_is_in_the_stream_with_content_and_digest(admin: Client) -> None:
    try:
        raw = await admin.jetstream().get_last_msg(subjects.STREAM, subjects.policy_activated(), direct=True)
    except NotFoundError:
        pytest.fail("no PolicyActivated in the stream")
    event = codec.decode_as(raw.data or b"", PolicyActivated)
    assert set(event.files) >= {"catalog.toml", "access_policy.csv", "issuers.jwks.json"}
    assert len(event.sha256) == 64 and event.version.startswith("sha256:")


async def test_issuer_keys_come_from_the_bundle_and_rotate_by_kid(admin: Client, client: Client, stack,
                                                                 tmp_path: Path) -> None:
    from enclave_gateway import issuer
    from enclave_gateway.services.settings import jwks_path

    original = Path(stack.policy_dir)
    idp_a, idp_b = tmp_path / "idp-a", tmp_path / "idp-b"
    issuer.ensure_keys(idp_a)
    issuer.ensure_keys(idp_b)

    def bundle_with(name: str, *idps: Path) -> Path:
        folder = shutil.copytree(original, tmp_path / name)
        keys = [json.loads(jwks_path(d).read_text())["keys"][0] for d in idps]
        (folder / "issuers.jwks.json").write_text(json.dumps({"keys": keys}))
        return folder

    async def code_for(token: str) -> str | None:
        chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="x"),), max_tokens=2)
        reply = codec.decode_reply((await client.request(subjects.submit("tester"), codec.encode(
            SubmitRequest(token=token, chat=chat)), timeout=30)).data)
        return reply.error.code if reply.error else None

    async def eventually(token: str, expected: str | None, timeout_s: float = 10.0) -> None:
        """Each replica switches when the activation reaches it: ask until the answer is the new one."""
        deadline = time.monotonic() + timeout_s
        while (got := await code_for(token)) != expected:
            assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
            await asyncio.sleep(0.1)

    token_a = issuer.issue(idp_a, subject="from-idp-a", team="gamma")
    token_b = issuer.issue(idp_b, subject="from-idp-b", team="gamma")
    try:
        assert await code_for(token_a) == "token_unknown_key"
        await runtime.activate(stack, bundle_with("both", idp_a, idp_b), "rotation-test")
        await eventually(token_a, None)
        await eventually(token_b, None)
        await runtime.activate(stack, bundle_with("only-b", idp_b), "rotation-test")
        await eventually(token_a, "token_unknown_key")  # key A rotated out
        assert await code_for(token_b) is None
    finally:
        await runtime.activate(stack, original, "rotation-test-restore")
