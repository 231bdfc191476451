"""Gateway overhead, in one run: the NATS path and the HTTP edge against a fixed-answer backend,
beside the bare 5-hop JetStream pipeline (the floor) and the backend called directly.

Prints each figure, the ratios, and ends with one line of JSON holding them all. DESIGN §8's
targets are compared in a later issue; figures only drift between machines, ratios less so.
Usage: .venv/bin/python bench/run.py [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import nats
from enclave_gateway import issuer, nats_auth, procs
from enclave_gateway.runtime import Gateway
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus
from enclave_gateway.services.credentials import load_creds
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOPS = 5
BODY = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 3}


async def measure(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> dict[str, float]:
    """Latency at 1 in flight (p50/p99 ms) and throughput at `concurrency` in flight (req/s)."""
    for _ in range(50):
        await call()
    lat = []
    for _ in range(min(500, requests)):
        t0 = time.perf_counter()
        await call()
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rps = requests / (time.perf_counter() - t0)
    return {"rps": round(rps, 1), "p50_ms": round(statistics.median(lat), 3),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3)}


def policy_dir(tmp: Path) -> Path:
    """The shipped bundle plus a `bench` team with a cap no benchmark reaches."""
    folder = tmp / "policies"
    shutil.copytree(ROOT / "policies", folder)
    with open(folder / "budgets.toml", "a") as f:
        f.write('\n[teams.bench]\ncap_micros = 1_000_000_000_000_000\nperiod = "month"\n')
    with open(folder / "access_policy.csv", "a") as f:
        f.write("p, team:bench, enclave-tiny\n")
    return folder


async def floor(gw: Gateway, requests: int, concurrency: int, data: Path) -> dict[str, float]:
    """The bare pipeline: 5 worker processes, one JetStream hop each, reply on the client's inbox.

    It runs on the gateway's own broker as the admin user (no permission checks), so both pay the
    same server; the gateway's users are permission-checked, which is part of what is measured.
    """
    admin = load_creds(gw.settings.creds_dir, "admin")
    assert admin is not None
    nc = await nats.connect(gw.nats_url, nkeys_seed=admin.seed_file, inbox_prefix=admin.inbox_prefix)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="FLOOR", subjects=["floor.>"], storage=StorageType.FILE))
    for i in range(HOPS):
        await js.add_consumer("FLOOR", ConsumerConfig(durable_name=f"hop{i}", filter_subject=f"floor.{i}",
                                                      ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000))
    workers = [procs.spawn([sys.executable, str(HERE / "floor_worker.py"), gw.nats_url, str(i), str(HOPS),
                            admin.seed_file],
                           data / "logs" / f"floor{i}.log") for i in range(HOPS)]
    for i, w in enumerate(workers):
        procs.wait_for_line(data / "logs" / f"floor{i}.log", "ready", w, 30)
    payload = codec.encode(SubmitRequest(token="x", chat=ChatBody(model="m", messages=(
        ChatMessage(role="user", content="benchmark"),))))

    async def call() -> None:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        await js.publish("floor.0", payload, headers={"reply": inbox, "id": uuid.uuid4().hex})
        await sub.next_msg(timeout=30)

    try:
        return await measure(call, requests, concurrency)
    finally:
        for w in workers:
            procs.stop(w)
        await nc.close()


async def scenarios(gw: Gateway, backend: str, token: str, requests: int, concurrency: int,
                    data: Path) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def direct() -> None:
            async with http.post(f"{backend}/v1/chat/completions", json=BODY) as r:
                await r.read()

        async def edge() -> None:
            async with http.post(f"{gw.http_url}/v1/chat/completions", json=BODY,
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
                await r.read()

        results["backend_direct"] = await measure(direct, requests, concurrency)
        results["gateway_http"] = await measure(edge, requests, concurrency)
    nc = await bus.connect(gw.settings, "app.bench")
    submit = codec.encode(SubmitRequest(token=token, chat=ChatBody(
        model="enclave-tiny", messages=(ChatMessage(role="user", content="benchmark"),), max_tokens=3)))

    async def via_nats() -> None:
        msg = await nc.request(subjects.submit("bench"), submit, timeout=30)
        assert codec.decode_reply(msg.data).completion is not None

    results["gateway_nats"] = await measure(via_nats, requests, concurrency)
    await nc.close()
    results["floor_5hop"] = await floor(gw, requests, concurrency, data)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp_name, fixed_gateway(Path(tmp_name)) as (gw, backend):
        tmp = Path(tmp_name)
        token = issuer.issue(tmp / "data" / "keys", subject="bench", team="bench", ttl_s=7200)
        results = asyncio.run(scenarios(gw, backend, token, args.requests, args.concurrency, tmp))
    base = results["backend_direct"]["p50_ms"]
    ratios = {
        "nats_rps_vs_floor": round(results["gateway_nats"]["rps"] / results["floor_5hop"]["rps"], 3),
        "http_rps_vs_floor": round(results["gateway_http"]["rps"] / results["floor_5hop"]["rps"], 3),
        "nats_added_p50_ms": round(results["gateway_nats"]["p50_ms"] - base, 3),
        "http_added_p50_ms": round(results["gateway_http"]["p50_ms"] - base, 3),
    }
    for name, r in results.items():
        print(f"{name:16s} {r['rps']:9.1f} req/s   p50 {r['p50_ms']:7.3f} ms   p99 {r['p99_ms']:7.3f} ms")
    for name, v in ratios.items():
        print(f"{name:20s} {v}")
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "results": results,
                      "ratios": ratios}))
    return 0


@contextlib.contextmanager
def fixed_gateway(tmp: Path) -> Iterator[tuple[Gateway, str]]:
    """A gateway in `tmp` whose one endpoint is the fixed-answer backend: (gateway, backend URL)."""
    port = procs.free_port()
    backend_proc = procs.spawn([sys.executable, str(HERE / "fixed_backend.py"), str(port)],
                               tmp / "logs" / "backend.log")
    backend = f"http://127.0.0.1:{port}"
    try:
        _wait(backend)
        nats_auth.ensure_creds(tmp / "data" / "creds", ("bench",))
        with Gateway(tmp / "data", policy_dir(tmp), nats_port=-1, http_port=0, endpoints={"local-llama": backend},
                     serve_tiny=None) as gw:
            yield gw, backend
    finally:
        procs.stop(backend_proc)


def _wait(url: str) -> None:
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


if __name__ == "__main__":
    sys.exit(main())
