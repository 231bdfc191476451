"""Invoker shell: call the model server over a pooled HTTP connection, publish the outcome.

Runs beside its model servers; `endpoints` maps the catalog's endpoint names to their addresses.
An endpoint this invoker does not know is a failed invocation, not a crash.
"""

import asyncio
import logging
import time

import aiohttp
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ...schemas import codec
from ...schemas.events import RouteSelected
from .. import bus, egress, worker
from ..settings import WorkerSettings
from . import decider

log = logging.getLogger("enclave_gateway.invoker")


async def call(session: aiohttp.ClientSession, base_url: str, body: bytes, timeout_s: float) -> decider.CallOutcome:
    """POST /v1/chat/completions; every failure becomes a CallFailed."""
    t0 = time.perf_counter()
    try:
        async with session.post(
            f"{base_url.rstrip('/')}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            # a model server's redirect is an answer, never followed: aiohttp connects to an IP
            # literal without asking the enclave's resolver, so a 307 could send the prompt anywhere
            allow_redirects=False,
        ) as resp:
            data = await resp.read()
            return decider.CallAnswered(status=resp.status, body=data, latency_ms=_ms(t0))
    except TimeoutError:
        return decider.CallFailed(error="timeout", detail=f"no answer in {timeout_s}s", latency_ms=_ms(t0))
    except aiohttp.ClientError as exc:
        if isinstance(exc.__cause__, egress.EgressRefused) or isinstance(exc.__context__, egress.EgressRefused):
            return decider.CallFailed(error="egress_refused", detail=str(exc), latency_ms=_ms(t0))
        return decider.CallFailed(error="unreachable", detail=repr(exc), latency_ms=_ms(t0))
    except egress.EgressRefused as exc:
        return decider.CallFailed(error="egress_refused", detail=str(exc), latency_ms=_ms(t0))


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
        await _serve(settings, s.js, stop)


async def _serve(settings: WorkerSettings, js: JetStreamContext, stop: asyncio.Event) -> None:
    allow = egress.parse(settings.egress_allow) if settings.egress_allow is not None else None
    refused = {name: why for name, url in settings.endpoints.items()
               if allow is not None and (why := egress.refuse_url(url, allow)) is not None}
    for name, why in refused.items():
        log.error("enclave mode: endpoint %s refused: %s", name, why)
    session = aiohttp.ClientSession(connector=egress.connector(allow, limit=256, keepalive_timeout=60))

    async def handle(msg: Msg) -> None:
        route = codec.decode_as(msg.data, RouteSelected, msg.subject)
        base_url = settings.endpoints.get(route.endpoint)
        if base_url is None:
            outcome: decider.CallOutcome = decider.CallFailed(
                error="unknown_endpoint", detail=f"this invoker serves no endpoint {route.endpoint!r}", latency_ms=0.0
            )
        elif route.endpoint in refused:
            outcome = decider.CallFailed(error="egress_refused", detail=refused[route.endpoint], latency_ms=0.0)
        elif (timeout_s := await _after_backoff(route, settings.invoke_timeout_s)) <= 0:
            outcome = decider.CallFailed(error="timeout", detail="the request's deadline passed before the call",
                                         latency_ms=0.0)
        else:
            outcome = await call(session, base_url, decider.request_body(route), timeout_s)
        for event in decider.decide(route, outcome, route.policy_version, bus.now_utc()):
            await bus.publish(js, bus.caused(event, route, msg))

    try:
        await bus.consume(js, "invoker", handle, stop, batch=128)
    finally:
        await session.close()
