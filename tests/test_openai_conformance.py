"""OpenAI conformance (issue 11 item 8), measured with OpenAI's own published OpenAPI document: the
chat-completions operation and what it references, kept offline in tests/openai/ (an excerpt of
github.com/openai/openai-openapi, MIT). Requests valid under it are answered, or refused with a
4xx whose error names what is unsupported, never a 5xx; answers and streamed chunks validate
against OpenAI's response schemas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import jsonschema_rs
import pytest
import schemathesis
from enclave_gateway.services.settings import WorkerSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from schemathesis.specs.openapi.converter import to_json_schema

pytestmark = pytest.mark.asyncio(loop_scope="session")
SPEC = Path(__file__).resolve().parent / "openai" / "chat-completions.openapi.json"
HONOURED = {"stream", "stream_options", "seed", "temperature", "user", "metadata", "n"}
BUDGET = settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))


def _chunk_validator() -> jsonschema_rs.Validator:
    """OpenAI's schema of one streamed chunk, `nullable` read as OpenAPI means it.

    OpenAI's document gives the chunk's schema as the `text/event-stream` schema; schemathesis
    reads that as the schema of each whole event (`{"data": ..., "event": ...}`), which no stream,
    OpenAI's included, satisfies. So a chunk is checked here, event by event, against that schema."""
    schemas = json.loads(SPEC.read_text())["components"]["schemas"]
    converted = {name: to_json_schema(schema, nullable_keyword="nullable", is_response_schema=True)
                 for name, schema in schemas.items()}
    return jsonschema_rs.validator_for({"$ref": "#/components/schemas/CreateChatCompletionStreamResponse",
                                        "components": {"schemas": converted}})


CHUNKS = _chunk_validator()


def _chunk_errors(body: str) -> list[str]:
    """Every schema error of every streamed chunk in an SSE body (none for `[DONE]`)."""
    payloads = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert payloads and payloads[-1] == "[DONE]", body[-300:]
    return [f"{e.message} at {list(e.instance_path)}" for p in payloads[:-1]
            for e in CHUNKS.iter_errors(json.loads(p))]


def _conform(http_url: str, token: str) -> dict[int, int]:
    operation = schemathesis.openapi.from_path(SPEC)["/chat/completions"]["POST"]
    statuses: dict[int, int] = {}

    @BUDGET
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE), answerable=st.booleans())
    def one(case: schemathesis.Case, answerable: bool) -> None:
        if answerable and isinstance(case.body, dict):  # the generated values of what the gateway
            # honours, on a model the catalog serves, with a short answer (the rest is refused by name)
            case.body = {**{k: v for k, v in case.body.items() if k in HONOURED}, "model": "enclave-tiny",
                         "max_tokens": 2, "messages": [{"role": "developer", "content": "be brief"},
                                                       {"role": "user", "content": [{"type": "text",
                                                                                     "text": "conform"}]}]}
        response = case.call(base_url=f"{http_url}/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        streamed = "text/event-stream" in str(response.headers.get("content-type", ""))
        if response.status_code == 200 and streamed:
            case.validate_response(response, checks=[not_a_server_error, content_type_conformance])
            assert _chunk_errors(response.text) == []
        elif response.status_code == 200:
            case.validate_response(response, checks=[not_a_server_error, content_type_conformance,
                                                     response_schema_conformance])
        else:  # a refusal: ours to word, clear and OpenAI-shaped
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
            error = response.json()["error"]
            assert error["code"] and error["message"] and error["type"], error

    one()
    return statuses


async def test_requests_valid_under_openais_document_are_answered_or_refused_clearly(
        stack: WorkerSettings, http_url: str, token_for) -> None:  # type: ignore[no-untyped-def]
    statuses = await asyncio.to_thread(_conform, http_url, token_for("gamma"))
    assert sum(statuses.values()) >= 60 and statuses.get(200, 0) >= 5, statuses


async def test_a_streamed_answer_validates_chunk_by_chunk_against_openais_schema(
        stack: WorkerSettings, http_url: str, token_for) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "enclave-tiny", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "stream"}]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{http_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token_for('gamma')}"}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        text = await r.text()
    assert _chunk_errors(text) == []
    broken = text.replace('"choices":', '"choice":', 1)
    assert any("choices" in e for e in _chunk_errors(broken))  # the check can fail
