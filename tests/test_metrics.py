"""GET /metrics (issue 11 item 10, in part): Prometheus' text format, counting what callers were told."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.events import LedgerTotals, RouteSelected
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _scrape(http_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{http_url}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], **labels: str) -> float:
    return sum(v for (name, lbls), v in samples.items()
               if name == "enclave_gateway_requests_total" and labels.items() <= dict(lbls).items())


async def test_metrics_count_what_callers_were_told_by_model_team_and_code(
        stack: WorkerSettings, http_url: str, token_for) -> None:  # type: ignore[no-untyped-def]
    before = await _scrape(http_url)
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}
            async with s.post(f"{http_url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200
        for model in ("no-such-model-1", "no-such-model-2"):  # any name a caller invents is one series, `other`
            body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
            async with s.post(f"{http_url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 404
    after = await _scrape(http_url)
    done = dict(entry="http", model="enclave-tiny", team="gamma", outcome="completed")
    assert _requests(after, **done) - _requests(before, **done) == 2
    missing = dict(entry="http", model="other", outcome="error", code="model_not_found")
    assert _requests(after, **missing) - _requests(before, **missing) == 2
    assert not any("no-such-model" in str(labels) for _, labels in after)
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", data=b"{not json",
                                                    headers={**headers, "Content-Type": "application/json"}) as r:
        assert r.status == 400  # refused at the entry, before any model or team is known: counted too
    refused = dict(entry="http", model="other", outcome="error", code="invalid_request")
    assert _requests(await _scrape(http_url), **refused) - _requests(after, **refused) == 1
    seconds = ("enclave_gateway_request_seconds_count", (("model", "enclave-tiny"), ("outcome", "completed")))
    assert after[seconds] - before.get(seconds, 0.0) == 2
    assert after[("enclave_gateway_bus_connected", ())] == 1
    for durable in ("authz", "budget", "router", "auditor", "edge", "invoker_local-llama"):
        assert ("enclave_gateway_consumer_pending", (("consumer", durable),)) in after, durable


async def test_labels_outside_the_policy_and_our_codes_are_other() -> None:
    from enclave_gateway.schemas.commands import ErrorBody, SubmitReply
    from enclave_gateway.services.edge.metrics import EdgeMetrics

    metrics = EdgeMetrics()
    for i in range(50):  # what a forged terminal event could name
        reply = SubmitReply(request_id=str(i), error=ErrorBody(code=f"zz_reason_{i}", message="x"))
        metrics.answered("nats", f"zz_model_{i}", ["enclave-tiny"], f"zz_team_{i}", ["alpha"], reply)
    text = metrics.exposition().decode()
    series = [line for line in text.splitlines() if line.startswith("enclave_gateway_requests_total{")]
    assert len(series) == 1 and 'model="other"' in series[0] and 'team="other"' in series[0]
    assert 'code="other"' in series[0] and series[0].endswith(" 50.0")


async def test_metrics_show_spend_against_caps_open_circuits_and_the_time_the_gateway_added(
        stack: WorkerSettings, http_url: str, token_for, admin: Client) -> None:  # type: ignore[no-untyped-def]
    before = await _scrape(http_url)
    headers = {"Authorization": f"Bearer {token_for('gamma')}"}
    async with aiohttp.ClientSession() as s:
        body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "what did it cost"}], "max_tokens": 2}
        sent = asyncio.get_running_loop().time()
        async with s.post(f"{http_url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            overhead_ms = float(r.headers["x-gw-overhead-ms"])  # issue 14 item 3: the figure on every answer
        waited_ms = (asyncio.get_running_loop().time() - sent) * 1000
    assert 0 < overhead_ms < waited_ms
    js = admin.jetstream()
    for _ in range(50):  # the settlement follows the reply
        newest = codec.decode_event((await js.get_last_msg(subjects.STREAM, subjects.ledger_filter("gamma"))).data)
        if isinstance(newest, LedgerTotals) and newest.reserved_micros == 0:
            break
        await asyncio.sleep(0.1)
    assert isinstance(newest, LedgerTotals) and newest.spent_micros > 0
    spent = ("enclave_gateway_budget_spent_micros", (("team", "gamma"),))
    for _ in range(40):  # spend and circuits are read from the broker at most every few seconds
        after = await _scrape(http_url)
        if after.get(spent) == newest.spent_micros:
            break
        await asyncio.sleep(0.25)
    assert after[("enclave_gateway_budget_spent_micros", (("team", "gamma"),))] == newest.spent_micros
    assert after[("enclave_gateway_budget_reserved_micros", (("team", "gamma"),))] == 0
    assert after[("enclave_gateway_budget_cap_micros", (("team", "gamma"),))] == newest.cap_micros
    added = ("enclave_gateway_added_seconds_count", (("model", "enclave-tiny"),))
    assert after[added] - before.get(added, 0.0) == 1
    added_sum = ("enclave_gateway_added_seconds_sum", (("model", "enclave-tiny"),))
    waited_sum = ("enclave_gateway_request_seconds_sum", (("model", "enclave-tiny"), ("outcome", "completed")))
    assert 0 < after[added_sum] - before.get(added_sum, 0.0) < after[waited_sum] - before.get(waited_sum, 0.0)
    assert after[added_sum] - before.get(added_sum, 0.0) == pytest.approx(overhead_ms / 1000, abs=2e-6)  # one figure
    route = codec.decode_event((await js.get_last_msg(subjects.STREAM, subjects.routes_of("enclave-tiny"))).data)
    assert isinstance(route, RouteSelected)
    circuits = {dict(lbls)["endpoint"]: v for (name, lbls), v in after.items()
                if name == "enclave_gateway_circuit_open" and dict(lbls)["model"] == "enclave-tiny"}
    assert circuits and circuits == {e: float(e in route.circuit_open) for e in circuits}, (circuits, route)
