"""OpenTelemetry spans of model calls (issue 11 item 10): off by default; when a collector is named,
one GenAI-convention span per attempt reaches it over real OTLP/HTTP, traced by the request id,
without a word of the prompt or the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import aiohttp
import msgspec
import pytest
from enclave_gateway.schemas.events import InvocationCompleted, InvocationFailed, RouteSelected
from enclave_gateway.services import egress, telemetry
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .conftest import Collector, collecting
from .samples import SAMPLES_BY_NAME


@pytest.fixture
def collector() -> Iterator[Collector]:
    with collecting() as got:
        yield got


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(span: Span) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in span.attributes}


def test_each_attempt_is_one_genai_span_traced_by_its_request_id_with_no_text(collector: Collector) -> None:
    route = SAMPLES_BY_NAME["RouteSelected"]
    done = SAMPLES_BY_NAME["InvocationCompleted"]
    failed = SAMPLES_BY_NAME["InvocationFailed"]
    assert isinstance(route, RouteSelected) and isinstance(done, InvocationCompleted)
    assert isinstance(failed, InvocationFailed)
    rid = "0f" * 16
    route = msgspec.structs.replace(route, request_id=rid, protocol="openai")
    failed = msgspec.structs.replace(failed, request_id=rid, detail="the server quoted: TOP SECRET PROMPT")
    done = msgspec.structs.replace(done, request_id=rid, content="THE SECRET ANSWER")
    spans = telemetry.start(collector.url, egress.parse(["127.0.0.0/8"]))  # as in an enclave, on loopback
    assert spans is not None
    spans.record(route, failed, "http://127.0.0.1:8081", failed.occurred_at)
    spans.record(msgspec.structs.replace(route, attempt=2), done, "http://10.1.2.3:9000",
                 done.occurred_at + timedelta(seconds=1))
    spans.shutdown()  # flushes the batch
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    assert len(collector.spans) == 2
    first, second = sorted(collector.spans, key=lambda s: _attrs(s)["enclave_gateway.attempt"])  # type: ignore[arg-type,return-value]
    for span in (first, second):
        assert span.trace_id.hex() == rid and span.name == f"chat {route.model_id}"
        assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
        assert span.end_time_unix_nano >= span.start_time_unix_nano
    a1, a2 = _attrs(first), _attrs(second)
    assert a1["gen_ai.operation.name"] == "chat" and a1["gen_ai.request.model"] == route.model_id
    assert a1["gen_ai.provider.name"] == "openai" and a1["error.type"] == failed.error
    assert first.status.code == first.status.STATUS_CODE_ERROR
    assert (a2["gen_ai.usage.input_tokens"], a2["gen_ai.usage.output_tokens"]) == (done.prompt_tokens,
                                                                                    done.completion_tokens)
    assert a2["gen_ai.response.finish_reasons"] == [done.finish_reason]
    assert (a2["server.address"], a2["server.port"]) == ("10.1.2.3", 9000)
    assert second.end_time_unix_nano - second.start_time_unix_nano == pytest.approx(done.latency_ms * 1e6, rel=1e-3)
    sent = b"".join(s.SerializeToString() for s in collector.spans)
    assert b"SECRET" not in sent  # neither the prompt, the answer nor a failure's detail


def test_spans_are_off_by_default_and_refused_where_the_enclave_forbids_the_collector(
        collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    allow = egress.parse(["127.0.0.0/8", "10.0.0.0/8", "localhost"])
    port = collector.url.split(":")[2].split("/")[0]
    assert telemetry.start("", None) is None
    for url in (f"http://192.0.2.2:{port}/v1/traces",  # outside the networks
                f"http://192.0.2.2:{port}\\@127.0.0.1:{port}/v1/traces",  # urlsplit and urllib3 disagree (review)
                f"http://user@127.0.0.1:{port}/v1/traces",
                f"http://localhost:{port}/v1/traces"):  # a name the exporter would resolve unguarded
        caplog.clear()
        assert telemetry.refuse_collector(url, allow) is not None, url
        assert telemetry.start(url, allow) is None and "spans are off" in caplog.text, url
    assert telemetry.refuse_collector(collector.url, allow) is None
    assert collector.spans == []


def test_the_exporter_ignores_proxy_settings_and_a_silent_collector_cannot_hold_the_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    monkeypatch.setenv("HTTP_PROXY", "http://192.0.2.9:3128")  # outside: spans must not go there
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts, never answers
    try:
        spans = telemetry.start(f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces", None)
        assert spans is not None and spans.session.trust_env is False  # HTTP_PROXY is not read
        assert spans.session.get_adapter("http://127.0.0.1/").proxy_manager == {}
        route, done = SAMPLES_BY_NAME["RouteSelected"], SAMPLES_BY_NAME["InvocationCompleted"]
        assert isinstance(route, RouteSelected) and isinstance(done, InvocationCompleted)
        for _ in range(2000):
            spans.record(route, done, "http://127.0.0.1:1", done.occurred_at)
        started = time.monotonic()
        spans.shutdown(within_s=2.0)
        assert time.monotonic() - started < 3.0
    finally:
        silent.close()


def test_a_request_id_that_is_no_trace_id_gets_a_random_one() -> None:
    assert telemetry.trace_id_of("ab" * 16) == int("ab" * 16, 16)
    assert telemetry.trace_id_of("0" * 32) is None  # the invalid trace id
    assert telemetry.trace_id_of("seq-12") is None and telemetry.trace_id_of("zz" * 16) is None


@pytest.mark.asyncio(loop_scope="session")
async def test_the_invoker_sends_the_span_of_a_real_call_to_the_deployments_collector(
        stack, http_url: str, token_for, span_collector: Collector) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(f"{http_url}/v1/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {token_for('gamma')}"}) as r:
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
    for _ in range(150):  # the batch goes out every 5 s
        mine = [s for s in list(span_collector.spans) if s.trace_id.hex() == rid]
        if mine:
            break
        await asyncio.sleep(0.1)
    assert len(mine) == 1, [s.name for s in span_collector.spans]
    attrs = _attrs(mine[0])
    assert mine[0].name == "chat enclave-tiny" and attrs["enclave_gateway.request_id"] == rid
    assert attrs["enclave_gateway.endpoint"] == "local-llama" and int(attrs["gen_ai.usage.output_tokens"]) >= 1  # type: ignore[call-overload]


def test_a_forged_model_time_cannot_poison_the_added_time() -> None:
    from enclave_gateway.services.edge.metrics import EdgeMetrics

    metrics = EdgeMetrics()
    metrics.added_time("enclave-tiny", ["enclave-tiny"], 0.5, -1e300)  # an invoker's invented latency
    metrics.added_time("enclave-tiny", ["enclave-tiny"], 0.5, 1e300)
    metrics.added_time("enclave-tiny", ["enclave-tiny"], 0.5, float("nan"))
    text = metrics.exposition().decode()
    [total] = [line for line in text.splitlines() if line.startswith("enclave_gateway_added_seconds_sum")]
    [count] = [line for line in text.splitlines() if line.startswith("enclave_gateway_added_seconds_count")]
    assert float(total.rsplit(" ", 1)[1]) == 0.5 and float(count.rsplit(" ", 1)[1]) == 2.0
