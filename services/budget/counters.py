"""The budget's I/O on rate-limit counters (JetStream counters in GW_RATES, ADR-49): add a request
to the counts `rates.to_count` names and read what each then holds, and give counts back."""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext

from ...schemas.events import RateCount
from . import rates

log = logging.getLogger("enclave_gateway.budget")
INCREMENT = "Nats-Incr"  # the counter header: the server adds it and acknowledges with the new value


async def take(js: JetStreamContext, todo: tuple[RateCount, ...]) -> tuple[RateCount, ...]:
    """Add the request to each count in order, stopping after the first that reads over its limit;
    returns the counts taken, each with what its counter read."""
    taken: list[RateCount] = []
    for count in todo:
        ack = await js.publish(rates.subject(count), b"", headers={INCREMENT: f"+{count.counted}"})
        if ack.val is None:
            raise RuntimeError(f"stream {ack.stream} did not count {rates.subject(count)}: not a counter stream")
        taken.append(msgspec.structs.replace(count, observed=int(ack.val)))
        if rates.over(taken[-1]):
            break
    return tuple(taken)


async def give(js: JetStreamContext, deltas: list[tuple[str, int]]) -> None:
    """Give counts back. A failure only leaves a minute's count high, which refuses more, never less."""
    for subject, delta in deltas:
        try:
            await js.publish(subject, b"", headers={INCREMENT: str(delta)})
        except Exception as exc:
            log.warning("budget: a rate count was not given back (%s): %s", type(exc).__name__, subject)
