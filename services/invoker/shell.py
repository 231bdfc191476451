"""Invoker shell: call the model server over a pooled HTTP connection, publish the outcome.

Runs beside its model servers; `endpoints` maps the catalog's endpoint names to their addresses,
and the invoker pulls only those endpoints' routes (one durable per endpoint, shared by every
invoker hosting it). A route to an endpoint it does not know (only a forged or misfiled one can
reach it) is a failed invocation, not a crash.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ...schemas import codec, subjects
from ...schemas.commands import StreamChunk
from ...schemas.events import InvocationCompleted, InvocationFailed, RouteSelected
from ...schemas.reasons import STREAM_BROKEN
from .. import bus, egress, telemetry, worker
from ..registry import invoker_durable
from ..settings import WorkerSettings
from . import adapters, decider, hosted

log = logging.getLogger("enclave_gateway.invoker")


async def call(session: aiohttp.ClientSession, up: hosted.Upstream, timeout_s: float) -> decider.CallOutcome:
    """POST the whole-answer call; every failure becomes a CallFailed."""
    t0 = time.perf_counter()
    try:
        async with _post(session, up, timeout_s) as resp:
            return decider.CallAnswered(status=resp.status, body=await _read_capped(resp), latency_ms=_ms(t0))
    except (TimeoutError, aiohttp.ClientError, egress.EgressRefused) as exc:
        error, detail = _why(exc, timeout_s)
        return decider.CallFailed(error=error, detail=detail, latency_ms=_ms(t0))


def _post(session: aiohttp.ClientSession, up: hosted.Upstream, timeout_s: float) -> Any:
    """The call, as an async context manager of its response."""
    # a model server's redirect is an answer, never followed: aiohttp connects to an IP literal
    # without asking the enclave's resolver, so a 307 could send the prompt anywhere
    return session.post(up.url, data=up.body, headers=up.headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
                        allow_redirects=False)


def _why(exc: BaseException, timeout_s: float) -> tuple[str, str]:
    """A failed call's error code and detail."""
    if isinstance(exc, TimeoutError):
        return "timeout", f"no (whole) answer in {timeout_s}s"
    if isinstance(exc, egress.EgressRefused) or isinstance(exc.__cause__, egress.EgressRefused) or isinstance(
            exc.__context__, egress.EgressRefused):
        return "egress_refused", str(exc)
    if isinstance(exc, decider.StreamBroken | ValueError):  # ValueError: aiohttp, a line longer than its buffer
        return "bad_response", str(exc)
    # never repr(): aiohttp's carries the request's headers, keys and signatures included
    return "unreachable", f"{type(exc).__name__}: {exc}"[:500]


Emit = Callable[[int, str], Awaitable[None]]
AFTER_FINISH_S = 2.0  # how long a stream that gave its finish reason may take to end
MAX_BODY_BYTES = 2 * decider.MAX_ANSWER_BYTES  # a whole answer's JSON around its content


async def call_streaming(session: aiohttp.ClientSession, up: hosted.Upstream, timeout_s: float,
                         emit: Emit) -> decider.CallOutcome:
    """POST a `stream: true` chat; each content chunk goes to `emit` as it arrives. A server that
    answers whole instead (no event stream) is read as an ordinary answer. A failure after tokens
    went out ends the answer there (`StreamReader.broken`): those tokens are what the caller got."""
    t0 = time.perf_counter()
    reader = adapters.reader_for(up.protocol)
    try:
        async with _post(session, up, timeout_s) as resp:
            if resp.status != 200 or not resp.content_type.startswith(("text/event-stream", "application/vnd.amazon")):
                return decider.CallAnswered(status=resp.status, body=await _read_capped(resp), latency_ms=_ms(t0))
            if isinstance(reader, adapters.BedrockStreamReader):
                await _read_frames(resp, reader, t0, emit)
                return reader.outcome(_ms(t0))
            while not reader.done:
                line = await _next(resp.content.readline(), reader)
                if not line:
                    break
                text = reader.feed(line, (time.perf_counter() - t0) * 1000.0)
                if text is not None:
                    await emit(reader.chunks - 1, text)
            return reader.outcome(_ms(t0))
    except (TimeoutError, decider.StreamBroken, ValueError, aiohttp.ClientError, egress.EgressRefused) as exc:
        return reader.broken(*_why(exc, timeout_s), _ms(t0))


async def _next(read: Awaitable[bytes], reader: decider.StreamReader) -> bytes:
    """The stream's next piece (b"" at its end). Once the answer gave its finish reason, its usage
    and end may follow, or nothing ever again: it waits AFTER_FINISH_S for them, then ends."""
    if reader.finish_reason is None:
        return await read
    try:
        return await asyncio.wait_for(read, AFTER_FINISH_S)
    except TimeoutError:
        return b""


async def _read_frames(resp: aiohttp.ClientResponse, reader: adapters.BedrockStreamReader, t0: float,
                       emit: Emit) -> None:
    """Bedrock's binary event stream, frame by frame."""
    buffer = hosted.frame_buffer()
    while True:
        data = await _next(resp.content.readany(), reader)
        if not data:
            return
        try:
            decoded = hosted.frames(data, buffer)
        except Exception as exc:  # botocore's parser: a bad prelude or CRC
            raise decider.StreamBroken(f"unreadable event-stream frame: {exc!r}") from exc
        for event_type, message_type, payload in decoded:
            text = reader.feed_event(event_type, message_type, payload, (time.perf_counter() - t0) * 1000.0)
            if text is not None:
                await emit(reader.chunks - 1, text)
        if reader.done:
            return


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or its first MAX_BODY_BYTES and a bit when larger (decided as a bad response)."""
    out = bytearray()
    async for piece in resp.content.iter_chunked(64 * 1024):
        out += piece
        if len(out) > MAX_BODY_BYTES:
            break
    return bytes(out)


def chunk_sender(nc: Client, route: RouteSelected) -> Emit:
    """Publish a route's tokens to its caller's chunk subject (core NATS: fast, never stored)."""
    subject = subjects.chunks_of(route.reply_to)

    async def emit(index: int, text: str) -> None:
        if subject is not None:
            chunk = StreamChunk(request_id=route.request_id, model=route.model_id, attempt=route.attempt,
                                index=index, content=text)
            await nc.publish(subject, codec.encode(chunk))

    return emit


async def _after_backoff(route: RouteSelected, longest_s: float) -> float:
    """Wait out a retry's backoff (never past the deadline); then how long the call may take."""
    if route.not_before is not None:
        wait = (route.not_before - bus.now_utc()).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, max(0.0, decider.call_timeout(route, bus.now_utc(), wait))))
    return decider.call_timeout(route, bus.now_utc(), longest_s)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    async with worker.without_policy(settings, "invoker") as s:
        await _serve(settings, s.nc, s.js, stop)


async def _serve(settings: WorkerSettings, nc: Client, js: JetStreamContext, stop: asyncio.Event) -> None:
    allow = egress.parse(settings.egress_allow) if settings.egress_allow is not None else None
    targets = {name: hosted.configured(url) for name, url in settings.endpoints.items()}
    refused = {name: why for name, (protocol, url) in targets.items() if allow is not None and (
        why := (f"the {protocol} adapter is refused in enclave mode" if protocol in adapters.HOSTED
                else egress.refuse_url(url, allow))) is not None}
    for name, why in refused.items():
        log.error("enclave mode: endpoint %s refused: %s", name, why)
    session = aiohttp.ClientSession(connector=egress.connector(allow, limit=256, keepalive_timeout=60))
    spans = telemetry.start(settings.otlp_traces_url, allow)

    async def handle(msg: Msg) -> None:
        route = codec.decode_as(msg.data, RouteSelected, msg.subject)
        protocol, base_url = targets.get(route.endpoint, ("", ""))
        up: hosted.Upstream | None = None
        if not base_url:
            outcome: decider.CallOutcome = decider.CallFailed(
                error="unknown_endpoint", detail=f"this invoker serves no endpoint {route.endpoint!r}", latency_ms=0.0
            )
        elif route.endpoint in refused:
            outcome = decider.CallFailed(error="egress_refused", detail=refused[route.endpoint], latency_ms=0.0)
        elif (timeout_s := await _after_backoff(route, settings.invoke_timeout_s)) <= 0:
            outcome = decider.CallFailed(error="timeout", detail="the request's deadline passed before the call",
                                         latency_ms=0.0)
        elif route.chat.stream and msg.metadata.num_delivered > 1:  # streamed before, by us or a replica that died
            outcome = decider.CallFailed(error=STREAM_BROKEN, detail="a streamed attempt delivered again: its tokens "
                                         "may have reached the caller, so it is not started again", latency_ms=0.0)
        elif allow is not None and route.protocol in adapters.HOSTED:  # nothing leaves the enclave
            outcome = decider.CallFailed(error="egress_refused", latency_ms=0.0,
                                         detail=f"the {route.protocol} adapter is refused in enclave mode")
        elif route.protocol != protocol:  # the keys an endpoint gets are the deployment's to say
            outcome = decider.CallFailed(error="protocol_mismatch", latency_ms=0.0, detail=(
                f"endpoint {route.endpoint!r} is configured for {protocol}, the route says {route.protocol}"))
        else:
            try:
                up = hosted.upstream(route, base_url)
            except hosted.NoCredentials as exc:
                outcome = decider.CallFailed(error="no_credentials", detail=str(exc), latency_ms=0.0)
            else:
                outcome = await (call_streaming(session, up, timeout_s, chunk_sender(nc, route)) if route.chat.stream
                                 else call(session, up, timeout_s))
        sent = up.headers if up else {}
        if isinstance(outcome, decider.CallAnswered) and outcome.status != 200:  # its body becomes the detail
            outcome = msgspec.structs.replace(outcome, body=hosted.scrub(
                outcome.body.decode(errors="replace"), sent).encode())
        for event in decider.decide(route, outcome, route.policy_version, bus.now_utc()):
            if isinstance(event, InvocationFailed):  # a server may echo what it was sent: no key is recorded
                event = msgspec.structs.replace(event, detail=hosted.scrub(event.detail, sent))
            await bus.publish(js, bus.caused(event, route, msg))
            if spans is not None and isinstance(event, InvocationCompleted | InvocationFailed):
                spans.record(route, event, base_url, event.occurred_at)

    if not settings.endpoints:
        log.warning("this invoker hosts no endpoint (gateway.toml [endpoints]): it takes no route")
    try:  # each hosted endpoint's durable, shared with the other invokers hosting it
        await asyncio.gather(stop.wait(), *(bus.consume(js, invoker_durable(name)[0], handle, stop, batch=128)
                               for name in sorted(settings.endpoints)))
    finally:
        await session.close()
        if spans is not None:
            spans.shutdown()  # what is still batched is sent, for at most a few seconds
