"""Schemathesis against the edge's own OpenAPI document (issue 11 item 7), with a fixed budget:
requests valid and invalid under docs/openapi.json never get a 5xx, and every answer conforms
to the document (status, content type, body schema)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import schemathesis
from enclave_gateway.services.settings import WorkerSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
BUDGET = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzz(http_url: str, token: str, mode: GenerationMode) -> tuple[int, int]:
    operation = schemathesis.openapi.from_path(SPEC)["/v1/chat/completions"]["POST"]
    calls = 0
    reached: list[object] = []
    answered: list[int] = []

    @BUDGET
    @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans(), plain=st.booleans())
    def one(case: schemathesis.Case, real: bool, plain: bool) -> None:
        nonlocal calls
        if real and isinstance(case.body, dict):  # half are made answerable: the pipeline runs them
            drop = ("tools", "functions", "tool_choice", "n", "temperature", "max_completion_tokens")
            kept = {k: v for k, v in case.body.items() if k not in drop and (not plain or k == "stream")}
            case.body = {**kept, "model": "enclave-tiny",  # plain: only `stream` of what was generated, so
                         "max_tokens": 2, "messages": [{"role": "user", "content": "fuzz"}]}  # it surely runs
            case.headers = {}  # no labels or deadline the generator made up
            reached.append(case.body)
        response = case.call(base_url=http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        calls += 1
        checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE and not real else CHECKS
        case.validate_response(response, checks=checks)
        if real:
            answered.append(response.status_code)

    one()
    return calls, answered.count(200)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
async def test_the_edge_answers_what_its_openapi_document_says_for_generated_requests(
        stack: WorkerSettings, http_url: str, token_for, mode: GenerationMode) -> None:  # type: ignore[no-untyped-def]
    calls, reached = await asyncio.to_thread(_fuzz, http_url, token_for("gamma"), mode)
    assert calls >= 20  # the budget was spent on real calls, not filtered away
    if mode is GenerationMode.POSITIVE:
        assert reached >= 5  # and some were answered by the model, their answers checked too
