"""GET /metrics (issue 11 item 10, in part): Prometheus' text format, counting what callers were told."""

from __future__ import annotations

import aiohttp
import pytest
from enclave_gateway.services.settings import WorkerSettings
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
