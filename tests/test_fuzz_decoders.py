"""Issue 11 item 7 (in part): fuzzing with a fixed budget. Whatever bytes a caller or a credential
sends, every decoder either reads them or raises its own DecodeError: no other exception, which a
worker would take for a bug and redeliver until it gives up."""

from __future__ import annotations

import json

import msgspec
import pytest
from enclave_gateway.schemas import codec
from enclave_gateway.services.edge import decider as edge
from enclave_gateway.services.invoker import adapters, decider as invoker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .samples import samples

BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=20)
SAMPLE_BYTES = [codec.encode(e) for e in samples()]


def mutated() -> st.SearchStrategy[bytes]:
    """Real events with bytes flipped, cut or inserted, and arbitrary JSON and bytes."""
    flip = st.tuples(st.sampled_from(SAMPLE_BYTES), st.integers(0, 2000), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1] % len(t[0])] + t[2] + t[0][t[1] % len(t[0]) + 1:])
    return st.one_of(st.binary(max_size=300), JSONISH.map(lambda v: json.dumps(v).encode()), flip,
                     st.sampled_from(SAMPLE_BYTES).map(lambda b: b[: len(b) // 2]))


@BUDGET
@given(mutated())
def test_any_bytes_as_an_event_are_read_or_a_decode_error(data: bytes) -> None:
    try:
        codec.decode_event(data)
    except codec.DecodeError:
        pass


@BUDGET
@given(mutated())
def test_any_bytes_on_gw_submit_or_as_a_chat_request_are_read_or_a_decode_error(data: bytes) -> None:
    for read in (codec.decode_submit, edge.parse_openai_request, codec.decode_reply, codec.decode_chunk):
        try:
            read(data)
        except codec.DecodeError:
            pass


@BUDGET
@given(mutated(), st.sampled_from(["openai", "anthropic", "bedrock"]))
def test_any_answer_from_a_model_server_is_an_outcome_never_a_crash(data: bytes, protocol: str) -> None:
    route = next(e for e in samples() if type(e).__name__ == "RouteSelected")
    route = msgspec.structs.replace(route, protocol=protocol)
    [event] = invoker.decide(route, invoker.CallAnswered(status=200, body=data, latency_ms=1.0), "pv",  # type: ignore[arg-type]
                             route.occurred_at)
    assert type(event).__name__ in ("InvocationCompleted", "InvocationFailed")
    reader = adapters.reader_for(protocol)
    for line in data.split(b"\n"):
        try:
            reader.feed(line, 1.0)
        except invoker.StreamBroken:
            break


@pytest.mark.parametrize("depth", [100, 10_000, 100_000])
def test_deep_nesting_is_a_decode_error_at_every_depth(depth: int) -> None:
    for data in (b"[" * depth + b"]" * depth, b'{"token":"t","chat":' + b"[" * depth + b"]" * depth + b"}"):
        with pytest.raises(codec.DecodeError):
            codec.decode_submit(data)
