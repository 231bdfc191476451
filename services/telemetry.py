"""OpenTelemetry spans of model calls (issue 11 item 10), off by default.

One CLIENT span per attempt, named and attributed by the GenAI semantic conventions
(`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...), exported over
OTLP/HTTP to the collector the deployment names (`[telemetry] otlp_traces_url`). In enclave mode
that address must pass the same egress rule as a model server's.

The trace id is the request id (both are 128 bits), so an operator holding an `X-Request-Id` or
an audit row finds every attempt of that request without any header carried through the bus.
Spans never hold prompt or completion text, nor a failure's detail (a server may quote the
prompt in it): only names, counts, times and our reason codes.

The SDK's exporter is the maintained implementation of the wire format, and its batch processor
sends from a thread, so a slow or absent collector never holds up a model call.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import threading
from datetime import datetime
from urllib.parse import urlsplit

from ..schemas.events import InvocationCompleted, InvocationFailed, RouteSelected
from . import egress

try:  # the `telemetry` extra: a deployment without spans needs none of it
    import requests
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised by a deployment without the extra
    RandomIdGenerator = object  # type: ignore[misc,assignment]
    INSTALLED = False
else:
    INSTALLED = True

log = logging.getLogger("enclave_gateway.telemetry")
_trace_of: contextvars.ContextVar[int | None] = contextvars.ContextVar("trace_of", default=None)
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "bedrock": "aws.bedrock"}


class RequestTraceIds(RandomIdGenerator):
    """Trace ids taken from the request being recorded; span ids stay random."""

    def generate_trace_id(self) -> int:
        chosen = _trace_of.get()
        return chosen if chosen is not None else super().generate_trace_id()


def trace_id_of(request_id: str) -> int | None:
    """The request id as a trace id, when it is one (32 hex digits, not all zero)."""
    if len(request_id) != 32:
        return None
    try:
        value = int(request_id, 16)
    except ValueError:
        return None
    return value or None


class ModelCallSpans:
    """The invoker's span exporter: `record` after each attempt, `shutdown` flushes what is left."""

    def __init__(self, otlp_traces_url: str, service: str = "enclave-gateway-invoker") -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}),
                                       id_generator=RequestTraceIds())
        self.session = requests.Session()
        self.session.trust_env = False  # no HTTP(S)_PROXY from the environment: spans go where configured, only
        self.session.max_redirects = 0
        exporter = OTLPSpanExporter(endpoint=otlp_traces_url, timeout=2, session=self.session)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("enclave_gateway")

    def record(self, route: RouteSelected, outcome: InvocationCompleted | InvocationFailed, base_url: str,
               ended: datetime) -> None:
        """The span of one attempt, timed by what the invoker measured (its end, less its latency)."""
        end_ns = int(ended.timestamp() * 1e9)
        start_ns = end_ns - int(outcome.latency_ms * 1e6)
        token = _trace_of.set(trace_id_of(route.request_id))
        try:
            span = self.tracer.start_span(f"chat {route.model_id}", kind=SpanKind.CLIENT, start_time=start_ns,
                                          attributes=attributes(route, outcome, base_url))
        finally:
            _trace_of.reset(token)
        if isinstance(outcome, InvocationFailed):
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def shutdown(self, within_s: float = 3.0) -> None:
        """Send what is batched, for at most `within_s`: a collector that never answers must not
        keep the invoker past its supervisor's grace (the exporter's thread is a daemon)."""
        closing = threading.Thread(target=self.provider.shutdown, daemon=True)
        closing.start()
        closing.join(within_s)


def attributes(route: RouteSelected, outcome: InvocationCompleted | InvocationFailed,
               base_url: str) -> dict[str, str | int | float | list[str]]:
    """The GenAI semantic conventions' attributes of a chat call, and ours under `enclave_gateway.`."""
    where = urlsplit(base_url.split("+", 1)[-1])
    attrs: dict[str, str | int | float | list[str]] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAMES.get(route.protocol, route.protocol),
        "gen_ai.request.model": route.model_id,
        "server.address": where.hostname or "",
        "enclave_gateway.request_id": route.request_id,
        "enclave_gateway.endpoint": route.endpoint,
        "enclave_gateway.attempt": route.attempt,
        "enclave_gateway.policy_version": route.policy_version,
    }
    if where.port is not None:
        attrs["server.port"] = where.port
    if route.max_tokens:
        attrs["gen_ai.request.max_tokens"] = route.max_tokens
    if route.chat.temperature is not None:
        attrs["gen_ai.request.temperature"] = route.chat.temperature
    if isinstance(outcome, InvocationCompleted):
        attrs |= {"gen_ai.response.model": outcome.model_id, "gen_ai.usage.input_tokens": outcome.prompt_tokens,
                  "gen_ai.usage.output_tokens": outcome.completion_tokens,
                  "gen_ai.response.finish_reasons": [outcome.finish_reason]}
    else:
        attrs["error.type"] = outcome.error
    return attrs


def start(otlp_traces_url: str | None, allow: egress.Allow | None) -> ModelCallSpans | None:
    """The spans, when the deployment asks for them and (in enclave mode) may reach the collector."""
    if not otlp_traces_url:
        return None
    if not INSTALLED:
        log.error("telemetry: spans are off: install the gateway's `telemetry` extra to send them")
        return None
    refused = None if allow is None else refuse_collector(otlp_traces_url, allow)
    if refused is not None:
        log.error("telemetry: spans are off: the collector is refused: %s", refused)
        return None
    return ModelCallSpans(otlp_traces_url)


def refuse_collector(url: str, allow: egress.Allow) -> str | None:
    """Why an enclave may not send spans to `url`, or None. Stricter than a model server's check:
    the exporter's HTTP client (urllib3) parses URLs its own way and resolves names unguarded, so
    only an IP literal inside the allowed networks is taken, with no user part or backslash (a
    review sent spans outside with `http://outside\\@127.0.0.1/`, read as loopback by urlsplit)."""
    if "@" in url or "\\" in url:
        return f"{url!r} has a user part or a backslash"
    refused = egress.refuse_url(url, allow)
    if refused is not None:
        return refused
    try:
        ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return f"{url!r} names a host: in enclave mode the collector is given by its address"
    return None
