"""The one load generator every system in bench/run.py is measured with.

`measure` takes latency at one caller (p50/p99) and throughput plus latency at `concurrency`
callers, each caller issuing its next request as soon as the previous one is answered.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

WARM_UP = 50


def _pct(sorted_ms: list[float], q: float) -> float:
    return round(sorted_ms[min(len(sorted_ms) - 1, max(0, int(len(sorted_ms) * q) - 1))], 3)


async def measure(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> dict[str, float]:
    """{rps, p50_ms, p99_ms (one caller), p50_ms_loaded, p99_ms_loaded (`concurrency` callers)}."""
    for _ in range(WARM_UP):
        await call()
    alone = []
    for _ in range(min(500, requests)):
        t0 = time.perf_counter()
        await call()
        alone.append((time.perf_counter() - t0) * 1000)
    alone.sort()
    t0 = time.perf_counter()
    loaded = sorted(await drive(call, requests, concurrency))
    rps = requests / (time.perf_counter() - t0)
    return {"rps": round(rps, 1), "p50_ms": round(statistics.median(alone), 3), "p99_ms": _pct(alone, 0.99),
            "p50_ms_loaded": round(statistics.median(loaded), 3), "p99_ms_loaded": _pct(loaded, 0.99)}


async def drive(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> list[float]:
    """`requests` calls by `concurrency` callers, each calling again once answered; each call's ms."""
    left = requests
    took: list[float] = []

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            await call()
            took.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return took


async def sustain(call: Callable[[], Awaitable[None]], seconds: float, concurrency: int) -> int:
    """`concurrency` callers for `seconds` (the load profiles are taken under); requests answered."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done
