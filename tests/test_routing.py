"""Issue 10: a caller never notices a dead model server. A model's endpoints are tried in catalog
order; a failed attempt is routed again to the next one, every step a recorded decision that
replay re-makes, and the request is charged once."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import msgspec
import pytest
from enclave_gateway import runtime
from enclave_gateway.engine import Engine
from enclave_gateway.replay.engine import diff, replay
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import EndpointObserved, InvocationFailed, RouteSelected
from enclave_gateway.schemas.events.route import Skipped
from enclave_gateway.services import bus
from enclave_gateway.services.authz.policy_view import dev_jwks
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APP, DUO_PORT, HANG_PORT, stream_events

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_dead_endpoint_is_never_noticed_and_each_fallback_is_recorded(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """The first requests fail over from the dead endpoint; once its circuit opens the router sends
    the rest straight to the live one, saying so in each route. No caller notices either way."""
    first = (await admin.jetstream().stream_info(subjects.STREAM)).state.last_seq + 1
    chat = ChatBody(model="enclave-tiny-ha", messages=(ChatMessage(role="user", content="fail over"),), max_tokens=4)

    async def ask() -> str:
        msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(token=token_for("gamma"),
                                                                                     chat=chat)), timeout=60)
        reply = codec.decode_reply(msg.data)
        assert reply.completion is not None, reply.error  # the caller sees an answer, not the dead server
        return reply.request_id

    rids = list(await asyncio.gather(*(ask() for _ in range(4))))
    await asyncio.sleep(0.3)  # every router replica folds the failures from the stream
    rids += [await ask() for _ in range(3)]  # within the cooldown after breaker_failures failures
    await runtime.wait_audited(admin, 60)
    failed_over, skipped = 0, 0
    for rid in rids:
        facts = [body for _, body in await stream_events(admin, rid)]
        kinds = [str(f["type"]) for f in facts]
        routes = [f for f in facts if f["type"] == "RouteSelected"]
        assert kinds.count("BudgetSettled") == 1 and "BudgetReleased" not in kinds  # charged once, nothing freed
        assert kinds.count("ResponseDelivered") == 1
        if "InvocationFailed" in kinds:  # tried at the dead one (retried once, with a backoff), then on
            failures = [f for f in facts if f["type"] == "InvocationFailed"]
            assert all((f["endpoint"], f["final"]) == ("gpu-node-down", False) for f in failures)
            assert [r["attempt"] for r in routes] == list(range(1, len(failures) + 2))
            assert [r["endpoint"] for r in routes] == ["gpu-node-down"] * len(failures) + ["local-llama"]
            assert routes[-1]["tried"] == ["gpu-node-down"] * len(failures)
            assert all(r["not_before"] for r in routes[1:-1])  # each retry waited its backoff
            assert [r["causation_id"] for r in routes[1:]] == [f["event_id"] for f in failures]
            failed_over += 1
        else:
            assert [(r["endpoint"], r["circuit_open"]) for r in routes] == [("local-llama", ["gpu-node-down"])]
            skipped += 1
    assert failed_over >= 1 and skipped >= 3  # the breaker opened, and every later request went around it
    stored = [(seq, subject, data) for data, subject, seq in
              await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")]
    result = replay(stored, dev_jwks(stack), first=first)
    assert result.ok, [(m.seq, m.decision, m.why, diff(m)) for m in result.mismatches]

    # an assessor's checks (a hostile review forged both): a route may pass over an endpoint as open
    # only when the failures stored before it say so, and a fallback must follow a recorded route
    window = [(seq, subject, codec.decode_event(data, subject)) for seq, subject, data in stored if seq >= first]
    opening = next((seq, subject, e) for seq, subject, e in window
                   if isinstance(e, RouteSelected) and e.attempt == 1 and not e.circuit_open)
    claimed = msgspec.structs.replace(opening[2], endpoint="local-llama", circuit_open=("gpu-node-down",))
    flagged = replay(_swap(stored, opening[0], claimed), dev_jwks(stack), first=first)
    assert any(m.seq == opening[0] and "passes over gpu-node-down as open" in m.why for m in flagged.mismatches)
    failure = next((seq, e) for seq, _, e in window if isinstance(e, InvocationFailed))
    orphan = msgspec.structs.replace(failure[1], causation_id="nothing-routed-this")
    flagged = replay(_swap(stored, failure[0], orphan), dev_jwks(stack), first=first)
    assert any("a failure of no recorded route" in m.why for m in flagged.mismatches), flagged.mismatches


def _swap(stored: list[tuple[int, str, bytes]], seq: int, event: object) -> list[tuple[int, str, bytes]]:
    # the forgery on its own subject (a route's subject names its endpoint), as a forger would store it
    return [(s, subjects.for_event(event), codec.encode(event)) if s == seq else (s, subject, data)  # type: ignore[arg-type]
            for s, subject, data in stored]


async def test_when_every_endpoint_fails_the_request_ends_once_with_its_money_back(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """enclave-tiny-down's one endpoint refuses connections: the attempt and its retry fail, nothing is left."""
    chat = ChatBody(model="enclave-tiny-down", messages=(ChatMessage(role="user", content="x"),), max_tokens=4)
    msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(token=token_for("gamma"), chat=chat)),
                               timeout=60)
    reply = codec.decode_reply(msg.data)
    assert reply.error is not None and reply.error.code == "invocation_failed"  # what callers always heard (502)
    assert "every endpoint of 'enclave-tiny-down' failed: gpu-node-down" in reply.error.message
    await runtime.wait_audited(admin, 60)
    kinds = [str(body["type"]) for _, body in await stream_events(admin, reply.request_id)]
    # tried once, and again unless its circuit is open (other tests fail it too): ended once either way
    assert 1 <= kinds.count("InvocationFailed") <= 2 and kinds.count("RouteUnavailable") == 1
    assert kinds.count("BudgetReleased") == 1 and kinds.count("ResponseDelivered") == 1


SWAP_MODEL = """
[[model]]
id = "swap-model"
endpoints = ["local-llama"]
context_length = 512
default_max_tokens = 32
prompt_micros_per_1k = 2000
completion_micros_per_1k = 6000
accreditation = "SECRET//SI//NOFORN"
"""


def _with_swap_model(original: Path, folder: Path, deprecated: bool) -> Path:
    shutil.copytree(original, folder)
    entry = SWAP_MODEL + ('status = "deprecated"\nreplacement = "enclave-tiny"\n' if deprecated else "")
    with open(folder / "catalog.toml", "a") as f:
        f.write(entry)
    with open(folder / "access_policy.csv", "a") as f:
        f.write("p, team:gamma, swap-model\n")
    return folder


async def test_a_deprecated_model_is_swapped_by_a_catalog_change_alone_while_traffic_flows(
        admin: Client, client: Client, stack: WorkerSettings, token_for, tmp_path: Path) -> None:
    """Issue 10 item 5: callers keep asking for swap-model; after the activation the replacement serves
    them, every RouteSelected after it names the substitution, and no request fails."""
    original = Path(stack.policy_dir)
    token = token_for("gamma")
    chat = ChatBody(model="swap-model", messages=(ChatMessage(role="user", content="swap"),), max_tokens=2)
    served: list[tuple[float, str, str]] = []
    try:
        before = await runtime.activate(stack, _with_swap_model(original, tmp_path / "active", False), "swap-test")
        await _until_active(stack, before.version)
        stop_at, swapped_at = time.monotonic() + 6.0, 0.0

        async def caller() -> None:
            while time.monotonic() < stop_at:
                msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(token=token, chat=chat)),
                                           timeout=60)
                reply = codec.decode_reply(msg.data)
                assert reply.completion is not None, reply.error  # no request fails, before, during or after
                served.append((time.monotonic(), reply.completion.model, reply.request_id))

        async def operator() -> None:
            nonlocal swapped_at
            await asyncio.sleep(2.0)
            changed = await runtime.activate(stack, _with_swap_model(original, tmp_path / "swap", True), "swap-test")
            await _until_active(stack, changed.version)
            swapped_at = time.monotonic()

        await asyncio.gather(caller(), caller(), operator())
    finally:
        await runtime.activate(stack, original, "swap-test-restore")
    models_before = {m for t, m, _ in served if t < swapped_at - 2.0}
    models_after = {m for t, m, _ in served if t > swapped_at + 0.5}
    assert models_before == {"swap-model"} and models_after == {"enclave-tiny"}, served
    late = next(rid for t, _, rid in served if t > swapped_at + 0.5)
    route = next(b for _, b in await stream_events(admin, late) if b["type"] == "RouteSelected")
    assert (route["requested_model"], route["model_id"], route["substituted_from"]) == (
        "swap-model", "enclave-tiny", "swap-model")


async def _until_active(settings: WorkerSettings, version: str, timeout_s: float = 10.0) -> None:
    """Until the active policy is `version` (workers apply an activation within a moment of it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        active = await runtime.active_policy(settings)
        if active is not None and active.version == version:
            await asyncio.sleep(0.5)  # every worker's feed has it
            return
        assert time.monotonic() < deadline, "activation not applied"
        await asyncio.sleep(0.1)


async def test_a_model_server_killed_during_traffic_fails_no_request_and_its_circuit_opens_then_closes(
        admin: Client, client: Client, stack: WorkerSettings, token_for, tmp_path: Path) -> None:
    """Issue 10 item 9: two llama.cpp servers serve one model; one is killed while callers keep
    asking and started again later. No request fails; its circuit opens, and closes after a probe."""
    duo = Engine(tmp_path, port=DUO_PORT, name="duo")
    await asyncio.to_thread(duo.start)
    chat = ChatBody(model="enclave-tiny-duo", messages=(ChatMessage(role="user", content="duo"),), max_tokens=2)
    served: list[tuple[float, str]] = []
    t0 = time.monotonic()
    try:
        async def caller() -> None:
            while time.monotonic() < t0 + 14.0:
                msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(
                    token=token_for("gamma"), chat=chat)), timeout=60)
                reply = codec.decode_reply(msg.data)
                assert reply.completion is not None, reply.error  # no request fails
                served.append((time.monotonic() - t0, reply.request_id))

        async def operator() -> None:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(duo.stop)  # killed while requests are in flight
            await asyncio.sleep(3.0)
            await asyncio.to_thread(duo.start)  # back; its circuit stays open until the cooldown ends

        await asyncio.gather(caller(), caller(), operator())
    finally:
        await asyncio.to_thread(duo.stop)
    await runtime.wait_audited(admin, 60)
    first_route: dict[str, tuple[str, tuple[str, ...]]] = {}
    for data, subject, _ in await bus.stored_on(admin.jetstream(), "gw.evt.route.selected.>", "test"):
        try:
            route = codec.decode_event(data, subject)
        except codec.DecodeError:  # junk other tests store on purpose (a buggy stage's bytes)
            continue
        if isinstance(route, RouteSelected) and route.attempt == 1:
            first_route[route.request_id] = (route.endpoint, route.circuit_open)
    first_routes = [(at, (first_route[rid][0], list(first_route[rid][1]))) for at, rid in served]
    assert any(open_ == ["duo-a"] for _, (_, open_) in first_routes)  # the circuit opened
    assert any(endpoint == "duo-a" and not open_ for _, (endpoint, open_) in first_routes[:3])  # used at first
    assert any(at > 12.0 and endpoint == "duo-a" and not open_ for at, (endpoint, open_) in first_routes), (
        first_routes)  # and closed again: duo-a serves requests once more


async def test_a_model_server_that_hangs_ends_the_request_at_its_deadline_with_the_money_back(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """Issue 10 items 3 and 9: the caller's deadline travels from the edge to the invoker, whose call
    gives up when it passes; no attempt starts after it; the caller hears `timeout`, the reservation
    is released, and the stream says so."""
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", HANG_PORT)
    try:
        chat = ChatBody(model="enclave-tiny-hang", messages=(ChatMessage(role="user", content="hang"),), max_tokens=2)
        t0 = time.monotonic()
        msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(
            token=token_for("gamma"), chat=chat, timeout_s=2.0)), timeout=60)
        waited = time.monotonic() - t0
    finally:
        server.close()
    reply = codec.decode_reply(msg.data)
    assert reply.error is not None and reply.error.code == "timeout", reply
    assert waited < 15.0  # the caller's 2 s, not the invoker's 60 s limit
    await runtime.wait_audited(admin, 60)
    facts = {str(b["type"]): b for _, b in await stream_events(admin, reply.request_id)}
    submitted, failed, ended = facts["RequestSubmitted"], facts["InvocationFailed"], facts["RouteUnavailable"]
    assert submitted["deadline_at"] and facts["RouteSelected"]["deadline_at"] == submitted["deadline_at"]
    assert failed["error"] == "timeout" and ended["reason"] == "timeout"
    assert facts["BudgetReleased"]["reason"] == "RouteUnavailable" and "BudgetSettled" not in facts


async def test_a_server_that_fails_once_is_retried_after_a_backoff_and_serves_the_request(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """Issue 10 item 3: a 503 may pass, so the same endpoint is tried again after its backoff."""
    from aiohttp import web

    calls: list[float] = []

    async def completions(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.Response(status=503, text="warming up")
        return web.json_response({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", DUO_PORT).start()
    try:
        chat = ChatBody(model="enclave-tiny-duo", messages=(ChatMessage(role="user", content="again"),), max_tokens=2)
        msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(token=token_for("gamma"),
                                                                                     chat=chat)), timeout=60)
    finally:
        await runner.cleanup()
    reply = codec.decode_reply(msg.data)
    assert reply.completion is not None and reply.completion.content == "ok", reply
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.04  # the second call waited out the backoff
    await runtime.wait_audited(admin, 60)
    facts = [b for _, b in await stream_events(admin, reply.request_id)]
    routes = [b for b in facts if b["type"] == "RouteSelected"]
    assert [(r["endpoint"], r["attempt"], r["tried"]) for r in routes] == [("duo-a", 1, []), ("duo-a", 2, ["duo-a"])]
    failed = next(b for b in facts if b["type"] == "InvocationFailed")
    assert failed["error"] == "http_503" and [b["type"] for b in facts].count("BudgetSettled") == 1


async def test_each_invoker_takes_only_the_routes_of_the_endpoints_it_hosts(
        admin: Client, client: Client, stack: WorkerSettings, engine: str, token_for) -> None:
    """Issue 10 item 4: the stack's invoker does not host solo-b, so its routes wait on solo-b's own
    durable (no `unknown_endpoint` failure, no fallback) until an invoker hosting it comes up; two
    replicas hosting it share that durable, and each request is served once."""
    from enclave_gateway.services.invoker import shell as invoker

    def ask(text: str) -> bytes:
        chat = ChatBody(model="enclave-tiny-solo", messages=(ChatMessage(role="user", content=text),), max_tokens=3)
        return codec.encode(SubmitRequest(token=token_for("gamma"), chat=chat))

    waiting = asyncio.create_task(client.request(subjects.submit(APP), ask("before any invoker"), timeout=60))
    await asyncio.sleep(1.5)
    assert not waiting.done()  # taken by no invoker: the stack's hosts other endpoints only
    solo = msgspec.structs.replace(stack, endpoints={"solo-b": engine})
    stop = asyncio.Event()
    replicas = [asyncio.create_task(invoker.run(solo, stop)) for _ in range(2)]
    try:
        replies = [codec.decode_reply((await waiting).data)]
        replies += [codec.decode_reply(m.data) for m in await asyncio.gather(*(
            client.request(subjects.submit(APP), ask(f"served {i}"), timeout=60) for i in range(6)))]
        assert all(r.completion is not None and r.completion.model == "enclave-tiny-solo" for r in replies)
        for r in replies:
            facts = [(subject, body) for subject, body in await stream_events(admin, r.request_id)]
            kinds = [str(b["type"]) for _, b in facts]
            assert "InvocationFailed" not in kinds and kinds.count("InvocationCompleted") == 1
            [route] = [subject for subject, b in facts if b["type"] == "RouteSelected"]
            assert route == "gw.evt.route.selected.enclave-tiny-solo.solo-b"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*replicas), 20)


async def test_a_caller_asks_for_a_routing_strategy_the_catalog_allows_and_is_refused_another(
        admin: Client, http_url: str, stack: WorkerSettings, token_for) -> None:
    """Issue 10 item 2: enclave-tiny lets requests ask for latency or cheapest. The router learned
    local-llama's latency from earlier completions (its own reader of them) and records the figures
    it ranked by; a strategy the catalog does not allow is refused, an unknown one is a bad request."""
    import aiohttp

    first = (await admin.jetstream().stream_info(subjects.STREAM)).state.last_seq + 1
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "route me"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the first may come before the router has read any completion
            async with http.post(f"{http_url}/v1/chat/completions", json=body,
                                 headers={**headers, "X-Routing-Strategy": "latency"}) as resp:
                assert resp.status == 200, await resp.text()
                rid = (await resp.json())["id"].removeprefix("chatcmpl-")
        async with http.post(f"{http_url}/v1/chat/completions", json=body,
                             headers={**headers, "X-Routing-Strategy": "weighted"}) as refused:
            assert refused.status == 403 and (await refused.json())["error"]["code"] == "strategy_not_allowed"
        async with http.post(f"{http_url}/v1/chat/completions", json=body,
                             headers={**headers, "X-Routing-Strategy": "fastest"}) as bad:
            assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_request"
    facts = {str(b["type"]): b for _, b in await stream_events(admin, rid)}
    route = facts["RouteSelected"]
    assert route["strategy"] == "latency" and route["endpoint"] == "local-llama"
    # local-llama was observed; local-llama-2 (hosted by no invoker in this stack) never was, so it comes last
    assert route["candidates"] == ["local-llama", "local-llama-2"]
    assert [e for e, _ in route["observed_ms"]] == ["local-llama"]  # type: ignore[union-attr]
    await runtime.wait_audited(admin, 60)
    stored = [(seq, subject, data) for data, subject, seq in
              await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")]
    result = replay(stored, dev_jwks(stack), first=first)  # latency-ranked routes re-made from their figures
    assert result.ok, [(m.seq, m.decision, m.why, diff(m)) for m in result.mismatches]
    # found by a hostile review: figures a route merely claims would steer it and still replay;
    # each must lie within the latencies of that endpoint's completions stored before it
    at = next(seq for seq, subject, data in stored if seq >= first and subject.startswith("gw.evt.route.selected")
              and b'"strategy":"latency"' in data)
    honest = codec.decode_event(next(d for q, _, d in stored if q == at))
    assert isinstance(honest, RouteSelected)
    forged = msgspec.structs.replace(honest, observed_ms=(("local-llama", 99_999.0),))
    flagged = replay(_swap(stored, at, forged), dev_jwks(stack), first=first)
    assert any(m.seq == at and "outside the latencies of its completions" in m.why for m in flagged.mismatches)


async def test_an_endpoint_no_invoker_pulls_for_is_passed_over_and_the_decision_says_so(
        admin: Client, client: Client, stack: WorkerSettings, token_for) -> None:
    """A hostile review found a model's first endpoint with no live invoker swallowed every request
    until its deadline. The router looks at each endpoint's durable (no pull waiting, twice in a row)
    and sends requests to the next endpoint, recording the skip; replay decides on that record."""
    first = (await admin.jetstream().stream_info(subjects.STREAM)).state.last_seq + 1
    chat = ChatBody(model="enclave-tiny-orphan", messages=(ChatMessage(role="user", content="who serves"),),
                    max_tokens=2)
    deadline = time.monotonic() + 20
    while True:
        msg = await client.request(subjects.submit(APP), codec.encode(SubmitRequest(
            token=token_for("gamma"), chat=chat, timeout_s=3.0)), timeout=30)
        reply = codec.decode_reply(msg.data)
        route = next(b for _, b in await stream_events(admin, reply.request_id) if b["type"] == "RouteSelected")
        if route["endpoint"] == "local-llama" or time.monotonic() > deadline:
            break
    assert reply.completion is not None and route["endpoint"] == "local-llama", route
    assert route["skipped"] == [{"endpoint": "orphan-ep", "reason": "no_invoker"}]
    await runtime.wait_audited(admin, 60)
    stored = [(seq, subject, data) for data, subject, seq in
              await bus.stored_on(admin.jetstream(), subjects.ALL_EVENTS, "test")]
    views = [decodable(d, subj) for _, subj, d in stored if subj.startswith("gw.evt.route.observed.")]
    assert any(isinstance(v, EndpointObserved) and (v.endpoint, v.served) == ("orphan-ep", False) for v in views)
    result = replay(stored, dev_jwks(stack), first=first)
    assert result.ok, [(m.seq, m.decision, m.why, diff(m)) for m in result.mismatches]
    # found by a hostile review: a router could claim any endpoint unserved to steer a request, and
    # replay re-made the steered route from the claim alone; a claim no stored view backs is named
    at = next(seq for seq, subject, data in stored if seq >= first and subject.startswith("gw.evt.route.selected")
              and b'"no_invoker"' in data)
    honest = codec.decode_event(next(d for q, _, d in stored if q == at))
    assert isinstance(honest, RouteSelected)
    forged = msgspec.structs.replace(honest, endpoint="orphan-ep",
                                     skipped=(Skipped("local-llama", "no_invoker"),))
    flagged = replay(_swap(stored, at, forged), dev_jwks(stack), first=first)
    assert any(m.seq == at and "no router's view stored before it says so" in m.why for m in flagged.mismatches)


def decodable(data: bytes, subject: str) -> object:
    """The event, or None for junk other tests store on purpose (a buggy stage's bytes)."""
    try:
        return codec.decode_event(data, subject)
    except codec.DecodeError:
        return None
