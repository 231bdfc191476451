"""The OpenAI-compatible HTTP routes of the edge (aiohttp)."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ...schemas import codec
from ...schemas.commands import ErrorBody, SubmitReply, SubmitRequest
from ..authz.tokens import TokenDefect
from . import decider, metrics, openai_shapes

if TYPE_CHECKING:
    from .shell import Edge

log = logging.getLogger("enclave_gateway.edge")
_json = msgspec.json.Encoder()
# The classification of what the caller sends and of the channel the answer goes to.
INPUT_LABEL = "X-Input-Classification"
OUTPUT_LABEL = "X-Output-Classification"
# How long the caller will wait, in seconds (the edge's request timeout when absent or longer): the
# request's deadline, enforced by every stage after the edge.
TIMEOUT_HEADER = "X-Request-Timeout"
STRATEGY_HEADER = "X-Routing-Strategy"  # ordered | weighted | cheapest | latency, where the catalog allows
REQUEST_ID_HEADER = "X-Request-Id"
OVERHEAD_HEADER = "x-gw-overhead-ms"  # the caller's wait less the model call, in milliseconds
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


READ_HEADERS = (INPUT_LABEL, OUTPUT_LABEL, TIMEOUT_HEADER, STRATEGY_HEADER, "Authorization")


def build(edge: Edge) -> web.Application:
    """The aiohttp application; the body limit is checked by us so the error is OpenAI-shaped."""
    app = web.Application(client_max_size=edge.settings.max_body_bytes + 1, middlewares=[_openai_shaped])

    async def post_chat(request: web.Request) -> web.StreamResponse:
        return await chat_completions(edge, request)

    async def get_models(request: web.Request) -> web.Response:
        return await list_models(edge, request)

    async def get_health(request: web.Request) -> web.Response:
        return await health()

    app.router.add_post("/v1/chat/completions", post_chat)
    app.router.add_get("/v1/models", get_models)
    async def get_ready(request: web.Request) -> web.Response:
        stages = await edge.readiness()
        ready = all(stages.values())
        return web.json_response({"status": "ready" if ready else "not_ready", "stages": stages},
                                 status=200 if ready else 503)

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=await edge.scrape(), headers={"Content-Type": metrics.CONTENT_TYPE})

    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)  # Prometheus text format
    app.router.add_get("/readyz", get_ready)  # every stage consumes: what `gateway up` waits for
    return app


@web.middleware
async def _openai_shaped(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method) in OpenAI's error shape, not text/plain."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
        body = {"error": {"message": f"{request.method} {request.path[:200]}: {exc.reason}", "code": code,
                          "type": "invalid_request_error", "param": None}}
        return web.Response(status=exc.status, body=_json.encode(body), content_type="application/json")


async def health() -> web.Response:
    """Liveness for load balancers."""
    return web.json_response({"status": "ok"})


def bearer(request: web.Request) -> str:
    """The session token from `Authorization: Bearer ...`, or ''."""
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def _error(err: ErrorBody, request_id: str | None = None) -> web.Response:
    status, body = openai_shapes.openai_error(err)
    headers = _id_header(request_id)
    if err.retry_after_s is not None:  # rate_limited: when the limit's minute ends
        headers["Retry-After"] = str(err.retry_after_s)
    return web.Response(status=status, body=_json.encode(body), content_type="application/json", headers=headers)


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _id_header(request_id: str | None) -> dict[str, str]:
    """`X-Request-Id`, as OpenAI sends it: the id the audit trail knows the request by, so a caller
    (or an operator holding its error) can find its record."""
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


async def chat_completions(edge: Edge, request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    limit = edge.settings.max_body_bytes
    try:
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length or 0)
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        reply = await edge.reject(
            uuid.uuid4().hex, "http:/v1/chat/completions", "body_too_large", f"request body over {limit} bytes", None
        )
        assert reply.error is not None
        return _error(reply.error, reply.request_id)
    try:
        req = decider.parse_openai_request(body)
        chat = decider.to_chat(req, request.headers.get(STRATEGY_HEADER))
        decider.validate_chat(chat)
    except codec.DecodeError as exc:
        reply = await edge.reject(uuid.uuid4().hex, "http:/v1/chat/completions", "invalid_request", str(exc), None)
        assert reply.error is not None
        return _error(reply.error, reply.request_id)
    # aiohttp reads a header byte that is not UTF-8 as a lone surrogate, which no event can carry
    garbled = [h for h in READ_HEADERS if not _utf8(request.headers.get(h, ""))]
    if garbled:
        reply = await edge.reject(uuid.uuid4().hex, "http:/v1/chat/completions", "invalid_request",
                                  f"{garbled[0]} is not valid UTF-8", None)
        assert reply.error is not None
        return _error(reply.error, reply.request_id)
    repeated = [h for h in READ_HEADERS if len(request.headers.getall(h, [])) > 1]
    if repeated:  # which one would count is the server's guess: none does
        reply = await edge.reject(uuid.uuid4().hex, "http:/v1/chat/completions", "invalid_request",
                                  f"{repeated[0]} may be given once", None)
        assert reply.error is not None
        return _error(reply.error, reply.request_id)
    wait = request.headers.get(TIMEOUT_HEADER)
    try:
        timeout_s = None if wait is None else float(wait)
        if timeout_s is not None and not 0 < timeout_s < 1e6:
            raise ValueError(wait)
    except ValueError:
        reply = await edge.reject(uuid.uuid4().hex, "http:/v1/chat/completions", "invalid_request",
                                  f"{TIMEOUT_HEADER} must be a number of seconds above 0", None)
        assert reply.error is not None
        return _error(reply.error, reply.request_id)
    cmd = SubmitRequest(
        token=bearer(request),
        chat=chat,
        input_label=request.headers.get(INPUT_LABEL),
        output_label=request.headers.get(OUTPUT_LABEL),
        timeout_s=timeout_s,
    )
    if req.stream:
        return await _stream(edge, request, cmd)
    reply, added_ms = await edge.call(cmd)
    if reply.error is not None:
        return _error(reply.error, reply.request_id)
    assert reply.completion is not None
    body_out = openai_shapes.openai_completion(reply.request_id, reply.completion, int(time.time()))
    headers = _id_header(reply.request_id)
    if added_ms is not None:  # what the gateway added, checkable in production (also in /metrics)
        headers[OVERHEAD_HEADER] = f"{added_ms:.3f}"
    return web.Response(body=_json.encode(body_out), content_type="application/json", headers=headers)


async def _stream(edge: Edge, request: web.Request, cmd: SubmitRequest) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format, each token as the model server produced it.

    A refusal before the first token is an ordinary HTTP error; a failure after it is an `error`
    event (what OpenAI's client raises as APIError). The reply closes the stream: whatever of its
    content the chunks did not bring, then the finish chunk, the usage chunk if asked, `[DONE]`.
    """
    writer = openai_shapes.ChunkWriter(int(time.time()), cmd.chat.include_usage)
    resp: web.StreamResponse | None = None
    try:
        async with aclosing(edge.stream(cmd)) as items:
            async for item in items:
                if isinstance(item, SubmitReply) and item.error is not None and resp is None:
                    return _error(item.error, item.request_id)
                if resp is None:
                    resp = web.StreamResponse(headers={**SSE_HEADERS, **_id_header(item.request_id)})
                    await resp.prepare(request)
                for event in writer.events(item):
                    await resp.write(event)
    except ConnectionResetError:  # the caller hung up: the edge records its reply as undelivered
        log.info("a streaming caller hung up")
    assert resp is not None
    return resp


async def list_models(edge: Edge, request: web.Request) -> web.Response:
    """GET /v1/models: the models this session may use, for a caller with a valid session."""
    models = edge.models_for(bearer(request))
    if isinstance(models, TokenDefect):
        return _error(ErrorBody(code=models.code, message=models.detail))
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "enclave-gateway"} for m in models]
    return web.json_response({"object": "list", "data": data})
