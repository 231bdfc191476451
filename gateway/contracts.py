"""The gateway's published contracts, generated from the code so they cannot drift (issue 11 item 10):
an OpenAPI document of the HTTP edge and an AsyncAPI document of the bus (every subject, its message
schema, who may publish and who consumes, from the registry of identities). `gateway contracts
--write docs` writes them; a test regenerates both and compares them with the committed files."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from .schemas import subjects
from .schemas.events import AnyEvent
from .schemas.reasons import HTTP_STATUS
from .services import registry
from .services.edge import http_app
from .services.edge.decider import OpenAIChatRequest
from .services.edge.openai_shapes import ChatCompletion, ChatCompletionChunk, OpenAIErrorEnvelope

OPENAPI_FILE, ASYNCAPI_FILE = "openapi.json", "asyncapi.json"
# One server-sent event of a streamed answer: `data` is a chat.completion.chunk as JSON (x-chunk-schema),
# an `error` object, or the final `[DONE]`.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
VERSION = "0.1.0"


def _components(types: list[Any]) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    found, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    return found, _clean_descriptions(schemas)


def _clean_descriptions(node: Any) -> Any:
    """Docstrings as `inspect.cleandoc` shapes them: msgspec 0.23 stopped doing it and 0.22 did, so
    the committed documents would depend on which one pip picked."""
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean_descriptions(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node


def _header(name: str, text: str, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["example"] = example
    return {"name": name, "in": "header", "required": False, "description": text, "schema": schema}


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1 of the edge: every route `http_app.build` serves, every status it answers."""
    (request, completion, chunk, error), schemas = _components(
        [OpenAIChatRequest, ChatCompletion, ChatCompletionChunk, OpenAIErrorEnvelope])
    error_json = {"application/json": {"schema": error}}
    request_id = {http_app.REQUEST_ID_HEADER: {"description": "the id the audit trail knows the request by",
                                               "schema": {"type": "string"}}}
    statuses = sorted({str(s) for s in HTTP_STATUS.values()})
    codes = {s: ", ".join(sorted(c for c, v in HTTP_STATUS.items() if str(v) == s)) for s in statuses}
    retry_after = {"Retry-After": {"description": "seconds until the rate limit's minute ends",
                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    errors = {s: {"description": f"refused or failed (code: {codes[s]})",
                  "headers": {**request_id, **(retry_after if s == "429" else {})}, "content": error_json}
              for s in statuses}
    chat = {
        "operationId": "createChatCompletion",
        "summary": "OpenAI-compatible chat completion, decided under policy and recorded",
        "security": [{"bearer": []}],
        "parameters": [
            _header(http_app.INPUT_LABEL, "classification of what the caller sends", "SECRET//SI"),
            _header(http_app.OUTPUT_LABEL, "classification of the channel the answer goes to", "SECRET//SI"),
            _header(http_app.TIMEOUT_HEADER, "seconds the caller waits (the request's deadline)", "30"),
            _header(http_app.STRATEGY_HEADER, "ordered | weighted | cheapest | latency, where the catalog allows"),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {"description": "the answer; server-sent chunks when `stream` is true",
                    "headers": {**request_id, http_app.OVERHEAD_HEADER: {
                        "description": "milliseconds the gateway added: the wait less the model call (not streamed)",
                        "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"}}},
                    "content": {"application/json": {"schema": completion},
                                "text/event-stream": {"schema": SSE_EVENT, "x-chunk-schema": chunk}}},
            **errors,
        },
    }
    plain = {"text/plain": {"schema": {"type": "string"}}}
    status_json = {"application/json": {"schema": {"type": "object"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Enclave Gateway edge", "version": VERSION,
                 "description": "The HTTP entry. Errors are OpenAI-shaped with our reason code (schemas/reasons.py)."},
        "paths": {
            "/v1/chat/completions": {"post": chat},
            "/v1/models": {"get": {"operationId": "listModels", "security": [{"bearer": []}],
                                   "summary": "the models this session may use",
                                   "responses": {"200": {"description": "a list", "content": status_json},
                                                 "401": {"description": "no valid session", "content": error_json}}}},
            "/health": {"get": {"operationId": "health", "summary": "liveness",
                                "responses": {"200": {"description": "alive", "content": status_json}}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "every stage consumes",
                                "responses": {"200": {"description": "ready", "content": status_json},
                                              "503": {"description": "a stage does not consume; which",
                                                      "content": status_json}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text format",
                                 "responses": {"200": {"description": "metrics", "content": plain}}}},
        },
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }


def _example(pattern: str) -> str:
    """A concrete subject a wildcard pattern matches (to ask the registry who may use it)."""
    return ".".join("x" if t in ("*", ">") else t for t in pattern.split("."))


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 of the bus: each event's subject, its payload schema, who may publish it and
    which durable consumes it, from subjects.EVENT_SUBJECTS and the registry."""
    refs, schemas = _components([AnyEvent])
    del refs
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    idents = registry.fixed()
    consumers = registry.durables()
    for name, pattern in sorted(subjects.EVENT_SUBJECTS.items()):
        channel = name[0].lower() + name[1:]
        channels[channel] = {
            "address": pattern,
            "messages": {name: {"name": name, "payload": {"$ref": f"#/components/schemas/{name}"}}},
        }
        concrete = _example(pattern)
        for ident in idents:
            if ident.kind == "service" and registry.may_publish(ident, concrete):
                operations[f"{ident.name}Sends{name}"] = {"action": "send",
                                                          "channel": {"$ref": f"#/channels/{channel}"}}
        for durable, spec in sorted(consumers.items()):
            if any(registry.matches(f, concrete) for f in spec.filters):
                operations[f"{durable}Receives{name}"] = {"action": "receive",
                                                          "channel": {"$ref": f"#/channels/{channel}"},
                                                          "x-durable": durable}
    operations["invokerReceivesRouteSelected"] = {  # each endpoint's invokers share its own durable
        "action": "receive", "channel": {"$ref": "#/channels/routeSelected"},
        "x-durable": f"{registry.INVOKER_PREFIX}<endpoint>", "x-filter": subjects.routes_to("<endpoint>")}
    channels["submit"] = {"address": f"{subjects.SUBMIT}.{{app}}", "parameters": {"app": {}},
                          "messages": {"SubmitRequest": {"name": "SubmitRequest"}},
                          "description": "core NATS request/reply: an application's requests, answered on its inbox"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Enclave Gateway bus", "version": VERSION,
                 "description": f"Every event is stored in JetStream stream {subjects.STREAM} on its subject."},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas},
    }


def render(doc: dict[str, Any]) -> str:
    """Stable text: sorted keys, two-space indent, a final newline (what the committed files hold)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(folder: Path) -> list[Path]:
    """Write both documents into `folder`."""
    out = []
    for name, doc in ((OPENAPI_FILE, openapi()), (ASYNCAPI_FILE, asyncapi())):
        path = folder / name
        path.write_text(render(doc))
        out.append(path)
    return out
