"""Soak (issue 11 item 11): a steady request rate through the HTTP edge for a long while, printing
each minute's throughput, p99 latency and every process's resident memory, then whether memory
grew. A leak shows as a process whose memory climbs after every bounded memory has filled (`--settle`):
caches and pools in the first window, routes until their deadline and a few minutes, the
auditor's chain heads (100,000), the broker's duplicate window (16 minutes of message ids).

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--rate 40] [--window 60] [--settle 2]
Ends with one line of JSON holding every window's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from enclave_gateway import issuer
from enclave_gateway.runtime import Gateway
from rich.progress import Progress

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BODY, fixed_gateway  # noqa: E402 (a script beside this one)

GROWTH_LIMIT = 0.10  # more than 10 % from the second window to the last is reported as growth


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def processes(gw: Gateway) -> dict[str, int]:
    """Every process of the gateway by name: the broker and each worker."""
    out = {name: p.pid for name, p in gw.workers.items()}
    if gw.broker is not None and gw.broker.proc is not None:
        out["nats-server"] = gw.broker.proc.pid
    return out


async def soak(gw: Gateway, token: str, minutes: float, rate: float, window_s: float) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"}
    windows: list[dict[str, object]] = []
    end = time.monotonic() + minutes * 60
    async with aiohttp.ClientSession() as http:
        in_flight: set[asyncio.Task[None]] = set()
        lat: list[float] = []
        errors = 0

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with http.post(f"{gw.http_url}/v1/chat/completions", json=BODY, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            lat.append((time.perf_counter() - t0) * 1000)

        with Progress() as progress:
            bar = progress.add_task("soak", total=minutes * 60)
            started = window_start = time.monotonic()
            sent = 0
            while time.monotonic() < end:
                due = started + sent / rate  # a steady rate, not as fast as possible
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
                if time.monotonic() - window_start >= window_s:
                    lat.sort()
                    windows.append({
                        "window": len(windows) + 1, "rps": round(len(lat) / (time.monotonic() - window_start), 1),
                        "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 1) if lat else None, "errors": errors,
                        "rss_mib": {n: round(rss_mib(pid), 1) for n, pid in processes(gw).items()},
                    })
                    row = windows[-1]
                    progress.console.print(f"window {row['window']}: {row['rps']} req/s, p99 {row['p99_ms']} ms, "
                                           f"errors {row['errors']}, rss MiB {row['rss_mib']}")
                    lat, errors, window_start = [], 0, time.monotonic()
                progress.update(bar, completed=time.monotonic() - started)
            await asyncio.gather(*in_flight, return_exceptions=True)
    return windows


def growth(windows: list[dict[str, object]], settle: int) -> dict[str, float]:
    """Per process: memory growth from window `settle` to the last, as a fraction."""
    if len(windows) <= settle:
        return {}
    first, last = windows[settle - 1]["rss_mib"], windows[-1]["rss_mib"]
    assert isinstance(first, dict) and isinstance(last, dict)
    return {n: round((last[n] - first[n]) / first[n], 3) for n in first if n in last and first[n]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second")
    ap.add_argument("--window", type=float, default=60.0, help="seconds per printed window")
    ap.add_argument("--settle", type=int, default=2,
                    help="the window growth is measured from: after every bounded memory has filled "
                         "(the broker's duplicate window is 16 minutes of message ids)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-soak-") as tmp_name, fixed_gateway(Path(tmp_name)) as (gw, _):
        token = issuer.issue(Path(tmp_name) / "data" / "keys", subject="soak", team="bench", ttl_s=86400)
        windows = asyncio.run(soak(gw, token, args.minutes, args.rate, args.window))
    grew = growth(windows, args.settle)
    flagged = {n: g for n, g in grew.items() if g > GROWTH_LIMIT}
    print(f"memory growth, window {args.settle} to last: {grew}")
    print("flat memory" if not flagged else f"GROWTH over {GROWTH_LIMIT:.0%}: {flagged}")
    print(json.dumps({"minutes": args.minutes, "rate": args.rate, "windows": len(windows),
                      "growth": json.dumps(grew), "flagged": len(flagged),
                      "detail": json.dumps(windows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
