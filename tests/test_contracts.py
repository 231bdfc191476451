"""The published contracts (issue 11 item 10): docs/openapi.json and docs/asyncapi.json are what
the code generates, name every route and every event subject, and the subjects are where events go."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import msgspec
from enclave_gateway import contracts
from enclave_gateway.schemas import subjects
from enclave_gateway.schemas.events import AnyEvent
from enclave_gateway.services import registry
from enclave_gateway.services.edge import http_app

from .samples import samples

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref" and isinstance(v, str)] + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolves(doc: dict[str, Any], ref: str) -> bool:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_committed_documents_are_what_the_code_generates() -> None:
    for name, doc in ((contracts.OPENAPI_FILE, contracts.openapi()), (contracts.ASYNCAPI_FILE, contracts.asyncapi())):
        committed = (DOCS / name).read_text()
        assert committed == contracts.render(doc), f"docs/{name} is stale: run `gateway contracts --write docs`"
        parsed = json.loads(committed)
        dangling = [r for r in _refs(parsed) if not _resolves(parsed, r)]
        assert not dangling, dangling


def test_the_openapi_document_names_exactly_the_routes_the_edge_serves() -> None:
    fake_edge = types.SimpleNamespace(settings=types.SimpleNamespace(max_body_bytes=1024))
    app = http_app.build(fake_edge)  # type: ignore[arg-type]
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    documented = {(m, p) for p, ops in contracts.openapi()["paths"].items() for m in ops}
    assert served == documented


def test_every_event_type_has_a_subject_pattern_that_matches_where_it_is_published() -> None:
    names = {t.__name__ for t in AnyEvent.__args__}  # type: ignore[attr-defined]
    assert names == set(subjects.EVENT_SUBJECTS)
    seen = set()
    for event in samples():
        kind = type(event).__name__
        assert registry.matches(subjects.EVENT_SUBJECTS[kind], subjects.for_event(event)), kind
        seen.add(kind)
    assert seen == names  # a sample of every type was checked


def test_the_asyncapi_document_says_who_publishes_and_who_consumes_each_event() -> None:
    doc = contracts.asyncapi()
    ops = doc["operations"]
    assert ops["edgeSendsRequestSubmitted"]["action"] == "send"
    assert ops["authzReceivesRequestSubmitted"]["x-durable"] == "authz"
    assert "invokerSendsRequestAuthorized" not in ops  # the registry does not let it
    assert "invokerReceivesRouteSelected" in ops
    for name in subjects.EVENT_SUBJECTS:  # every event is consumed by the auditor at least
        assert f"auditorReceives{name}" in ops, name
        schema = doc["components"]["schemas"][name]
        assert schema["properties"]["type"]["enum"] == [name] or "type" in schema["required"], name


def test_a_sample_of_every_event_validates_structurally_against_its_published_schema() -> None:
    schemas = contracts.asyncapi()["components"]["schemas"]
    for event in samples():
        body = msgspec.json.decode(msgspec.json.encode(event))
        schema = schemas[type(event).__name__]
        missing = [f for f in schema.get("required", []) if f not in body]
        unknown = [f for f in body if f not in schema["properties"]]
        assert not missing and not unknown, (type(event).__name__, missing, unknown)
