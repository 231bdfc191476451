"""The gateway's added time to first token: `stream: true` chat completions sent to the llama.cpp
server directly and through the whole gateway (edge, authz, budget, router, invoker, each hop
acknowledged by JetStream), alternating so both see the same machine. Prints the figures and one
JSON line. Speed is never asserted; run it on a quiet machine.

Usage: .venv/bin/python bench/ttft.py [--requests N] [--max-tokens T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from enclave_gateway import issuer
from enclave_gateway.runtime import Gateway

ROOT = Path(__file__).resolve().parent.parent


async def first_token_ms(http: aiohttp.ClientSession, url: str, body: dict[str, object],
                         headers: dict[str, str]) -> float:
    """Milliseconds from sending the request to the first content chunk; the rest is read out."""
    t0 = time.perf_counter()
    first = None
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = (time.perf_counter() - t0) * 1000.0
    assert first is not None, "no content chunk"
    return first


def summary(label: str, ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    p50, p95 = statistics.median(ms), ms[max(0, round(0.95 * len(ms)) - 1)]
    print(f"{label:28} median {p50:7.2f} ms   p95 {p95:7.2f} ms")
    return {"p50": round(p50, 3), "p95": round(p95, 3)}


async def measure(gw: Gateway, token: str, n: int, max_tokens: int) -> dict[str, float]:
    assert gw.engine is not None
    body = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "first token, please"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    direct: list[float] = []
    through: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # warm both paths: connections, the engine's prompt cache
            await first_token_ms(http, gw.engine.url, body, {})
            await first_token_ms(http, gw.http_url, body, {"Authorization": f"Bearer {token}"})
        for _ in range(n):
            direct.append(await first_token_ms(http, gw.engine.url, body, {}))
            through.append(await first_token_ms(http, gw.http_url, body, {"Authorization": f"Bearer {token}"}))
    d, g = summary("engine directly", direct), summary("through the gateway", through)
    added = {"p50": round(g["p50"] - d["p50"], 3), "p95": round(g["p95"] - d["p95"], 3)}
    print(f"{'added by the gateway':28} median {added['p50']:7.2f} ms   p95 {added['p95']:7.2f} ms")
    return {"requests": n, "direct_p50_ms": d["p50"], "direct_p95_ms": d["p95"], "gateway_p50_ms": g["p50"],
            "gateway_p95_ms": g["p95"], "added_p50_ms": added["p50"], "added_p95_ms": added["p95"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        gw = Gateway(Path(tmp), ROOT / "policies", nats_port=-1, http_port=0, endpoints={},
                     serve_tiny="local-llama")
        with gw:
            token = issuer.issue(Path(tmp) / "keys", subject="bench", team="alpha")
            figures = asyncio.run(measure(gw, token, args.requests, args.max_tokens))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
