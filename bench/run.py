"""Gateway overhead, in one run, against the floors and LiteLLM (issue 14, DESIGN §8).

Every system answers the same request from the same fixed-answer backend:
- the backend alone;
- LiteLLM's proxy in front of it (its own venv, offline; bench/tools.py);
- the HTTP floor: a bare aiohttp front over the same 5 JetStream hops plus the upstream call;
- the gateway's HTTP edge, full logic on;
- the gateway's NATS path, full logic on;
- the bare 5-hop JetStream pipeline (the floor);
- the same bare pipeline with the gateway's message pattern (7 hops and the readers the auditor and
  the router add, no logic): what the gateway's shape costs before any of its work.
It also counts the stream messages and deliveries per gateway request and the CPU each process
spends per request. The HTTP systems are driven by one load generator (bench/loadgen.py), the
NATS ones by NATS requests. It prints req/s, p50 and p99 at one caller and at `--concurrency`
callers, the ratios against DESIGN §8's targets, saves py-spy profiles of every gateway process
under load, and ends with one line of JSON. Figures drift between machines and moments; ratios
taken in one run much less.
Usage: .venv/bin/python bench/run.py [--requests N] [--concurrency C] [--no-litellm] [--no-profiles]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import nats
from enclave_gateway import issuer, nats_auth, procs
from enclave_gateway.runtime import Gateway
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus
from enclave_gateway.services.credentials import Creds, load_creds
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import tools

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOPS = 5
# the gateway stores 7 events per request and hands out about 22 (bench prints the count): 7 hops,
# each read by its stage, plus the auditor's two readers of everything and the router's of two
GATEWAY_HOPS = 7
BODY = {"model": "enclave-tiny", "messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 3}
TARGETS = {  # DESIGN §8 and issue 14: (ratio, at least or at most, the bound)
    "nats_rps_vs_floor": (">=", 0.5),
    "nats_added_p50_ms": ("<=", 3.0),
    "http_rps_vs_http_floor": (">=", 0.67),
    "http_rps_vs_litellm": (">=", 10.0),
    "http_added_p50_minus_litellm_ms": ("<", 0.0),
}
PROFILE_S = 8


async def measure(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> dict[str, float]:
    return await loadgen.measure(call, requests, concurrency)


def policy_dir(tmp: Path) -> Path:
    """The shipped bundle plus a `bench` team with a cap no benchmark reaches."""
    folder = tmp / "policies"
    shutil.copytree(ROOT / "policies", folder)
    with open(folder / "budgets.toml", "a") as f:
        f.write('\n[teams.bench]\ncap_micros = 1_000_000_000_000_000\nperiod = "month"\n')
    with open(folder / "access_policy.csv", "a") as f:
        f.write("p, team:bench, enclave-tiny\n")
    return folder


@contextlib.asynccontextmanager
async def bare_pipeline(gw: Gateway, data: Path, stream: str, backend: str | None = None, hops: int = HOPS,
                        tapped: bool = False) -> AsyncIterator[tuple[nats.NATS, Creds, list[int]]]:
    """`hops` worker processes, one JetStream hop each, on the gateway's own broker as the admin
    user (no permission checks: both pay the same server, and the gateway's checks are part of what
    is measured). With `backend`, the last hop calls it before replying (the HTTP floor); `tapped`
    adds the readers of the gateway's message pattern (bench/floor_tap.py)."""
    nc, admin = await admin_connection(gw)
    js = nc.jetstream()
    prefix = stream.lower()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"], storage=StorageType.FILE))
    for i in range(hops):
        await js.add_consumer(stream, ConsumerConfig(durable_name=f"{prefix}{i}", filter_subject=f"{prefix}.{i}",
                                                     ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000))
    workers = [procs.spawn([sys.executable, str(HERE / "floor_worker.py"), gw.nats_url, str(i), str(hops),
                            admin.seed_file, stream, *([backend] if backend else [])],
                           data / "logs" / f"{prefix}{i}.log") for i in range(hops)]
    if tapped:
        await js.add_consumer(stream, ConsumerConfig(durable_name=f"{prefix}tap", filter_subject=f"{prefix}.>",
                                                     ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000))
        workers.append(procs.spawn([sys.executable, str(HERE / "floor_tap.py"), gw.nats_url, admin.seed_file, stream],
                                   data / "logs" / f"{prefix}{hops}.log"))
    try:
        for i, w in enumerate(workers):
            procs.wait_for_line(data / "logs" / f"{prefix}{i}.log", "ready", w, 30)
        yield nc, admin, [w.pid for w in workers]
    finally:
        for w in workers:
            procs.stop(w)
        await js.delete_stream(stream)
        await nc.close()


async def floor(gw: Gateway, requests: int, concurrency: int, data: Path, stream: str = "FLOOR", hops: int = HOPS,
                tapped: bool = False) -> dict[str, float]:
    """The bare pipeline driven over NATS: publish to the first hop, wait on an inbox."""
    payload = codec.encode(SubmitRequest(token="x", chat=ChatBody(model="m", messages=(
        ChatMessage(role="user", content="benchmark"),))))
    async with bare_pipeline(gw, data, stream, hops=hops, tapped=tapped) as (nc, _, pids):
        js = nc.jetstream()
        if gw.broker is not None and gw.broker.proc is not None:
            pids.append(gw.broker.proc.pid)
        before = sum(cpu_s(pid) for pid in pids)

        async def call() -> None:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, max_msgs=1)
            await js.publish(f"{stream.lower()}.0", payload, headers={"reply": inbox, "id": uuid.uuid4().hex})
            await sub.next_msg(timeout=30)

        result = await measure(call, requests, concurrency)
        calls = loadgen.WARM_UP + min(500, requests) + requests
        result["cpu_ms_per_request"] = round((sum(cpu_s(pid) for pid in pids) - before) * 1000 / calls, 3)
        return result


async def http_floor(gw: Gateway, backend: str, http: aiohttp.ClientSession, requests: int, concurrency: int,
                     data: Path) -> dict[str, float]:
    """The HTTP floor: aiohttp front, the same 5 hops, the last calling the backend."""
    async with bare_pipeline(gw, data, "FLOORH", backend) as (_, admin, _pids):
        port = procs.free_port()
        front = procs.spawn([sys.executable, str(HERE / "http_floor.py"), gw.nats_url, admin.seed_file, "FLOORH",
                             str(port)], data / "logs" / "http-floor.log")
        try:
            procs.wait_for_line(data / "logs" / "http-floor.log", "ready", front, 30)
            return await measure(_poster(http, f"http://127.0.0.1:{port}"), requests, concurrency)
        finally:
            procs.stop(front)


def _poster(http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None,
            body: dict[str, object] | None = None) -> Callable[[], Awaitable[None]]:
    """One chat request to `base`, answered 200 (the load generator's call for every HTTP system)."""
    async def call() -> None:
        async with http.post(f"{base}/v1/chat/completions", json=body or BODY, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"{base} answered {r.status}: {(await r.text())[:300]}")
            await r.read()
    return call


async def scenarios(gw: Gateway, backend: str, token: str, requests: int, concurrency: int,
                    data: Path, with_litellm: bool) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        print("backend alone ...", flush=True)
        results["backend_direct"] = await measure(_poster(http, backend), requests, concurrency)
        if with_litellm:
            print("LiteLLM proxy ...", flush=True)
            with tools.litellm_proxy(backend, procs.free_port(), data / "logs") as (litellm, key):
                results["litellm"] = await measure(
                    _poster(http, litellm, {"Authorization": f"Bearer {key}"}), requests, concurrency)
        print("HTTP floor ...", flush=True)
        results["http_floor"] = await http_floor(gw, backend, http, requests, concurrency, data)
        print("gateway, HTTP edge ...", flush=True)
        results["gateway_http"] = await measure(
            _poster(http, gw.http_url, {"Authorization": f"Bearer {token}"}), requests, concurrency)
    print("gateway, NATS path ...", flush=True)
    results["gateway_nats"] = await measure(nats_caller(await bus.connect(gw.settings, "app.bench"), token),
                                            requests, concurrency)
    print("bare 5-hop floor ...", flush=True)
    results["floor_5hop"] = await floor(gw, requests, concurrency, data)
    print("the floor with the gateway's message pattern ...", flush=True)
    results["floor_gateway_shaped"] = await floor(gw, requests, concurrency, data, "SHAPED", GATEWAY_HOPS, True)
    return results


def nats_caller(nc: nats.NATS, token: str, content: str = "benchmark") -> Callable[[], Awaitable[None]]:
    """One request on the gateway's NATS entry, answered with a completion."""
    submit = codec.encode(SubmitRequest(token=token, chat=ChatBody(
        model="enclave-tiny", messages=(ChatMessage(role="user", content=content),), max_tokens=3)))

    async def call() -> None:
        msg = await nc.request(subjects.submit("bench"), submit, timeout=60)
        reply = codec.decode_reply(msg.data)
        if reply.completion is None:
            raise RuntimeError(f"the gateway refused: {reply.error}")
    return call


def ratios_of(results: dict[str, dict[str, float]]) -> dict[str, float]:
    r = results
    base = r["backend_direct"]["p50_ms"]
    out = {
        "nats_rps_vs_floor": r["gateway_nats"]["rps"] / r["floor_5hop"]["rps"],
        "nats_rps_vs_gateway_shaped_floor": r["gateway_nats"]["rps"] / r["floor_gateway_shaped"]["rps"],
        "gateway_shaped_floor_vs_floor": r["floor_gateway_shaped"]["rps"] / r["floor_5hop"]["rps"],
        "nats_added_p50_ms": r["gateway_nats"]["p50_ms"] - base,
        "http_rps_vs_http_floor": r["gateway_http"]["rps"] / r["http_floor"]["rps"],
        "http_added_p50_ms": r["gateway_http"]["p50_ms"] - base,
    }
    if "litellm" in r:
        out["http_rps_vs_litellm"] = r["gateway_http"]["rps"] / r["litellm"]["rps"]
        out["litellm_added_p50_ms"] = r["litellm"]["p50_ms"] - base
        out["http_added_p50_minus_litellm_ms"] = out["http_added_p50_ms"] - out["litellm_added_p50_ms"]
    return {k: round(v, 3) for k, v in out.items()}


def verdicts(ratios: dict[str, float]) -> dict[str, bool]:
    return {k: (ratios[k] >= bound if op == ">=" else ratios[k] <= bound if op == "<=" else ratios[k] < bound)
            for k, (op, bound) in TARGETS.items() if k in ratios}


async def profiled(gw: Gateway, token: str, concurrency: int, out: Path) -> dict[str, list[tuple[str, float]]]:
    """py-spy on every gateway worker for PROFILE_S seconds under `concurrency` HTTP callers; the
    collapsed stacks are kept in `out`, the hottest functions returned."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        call = _poster(http, gw.http_url, {"Authorization": f"Bearer {token}"})
        spies = tools.profile({name: p.pid for name, p in gw.workers.items()}, PROFILE_S, out)
        done = await loadgen.sustain(call, PROFILE_S + 1, concurrency)
    for spy in spies.values():
        spy.wait(30)
    print(f"profiles of {len(spies)} processes under {concurrency} callers ({done} requests) in {out}")
    return {name: tools.hottest(out / f"{name}.txt") for name in spies if (out / f"{name}.txt").exists()}


def gateway_pids(gw: Gateway) -> dict[str, int]:
    """Every process of the gateway: its workers, and the broker it started."""
    pids = {name: p.pid for name, p in gw.workers.items()}
    if gw.broker is not None and gw.broker.proc is not None:
        pids["nats-server"] = gw.broker.proc.pid
    return pids


async def admin_connection(gw: Gateway) -> tuple[nats.NATS, Creds]:
    """The operator's connection to the gateway's broker (no permission checks)."""
    admin = load_creds(gw.settings.creds_dir, "admin")
    assert admin is not None
    return await nats.connect(gw.nats_url, nkeys_seed=admin.seed_file, inbox_prefix=admin.inbox_prefix), admin


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_request(gw: Gateway, token: str, concurrency: int, requests: int) -> dict[str, float]:
    """CPU milliseconds each gateway process (and the broker) spends per request, over `requests`
    HTTP requests at `concurrency` callers: on a machine whose cores are all busy, throughput is
    the cores divided by this sum."""
    pids = gateway_pids(gw)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        call = _poster(http, gw.http_url, {"Authorization": f"Bearer {token}"})
        nc, _ = await admin_connection(gw)
        stored, delivered = await _stream_counts(nc)
        before = {k: cpu_s(v) for k, v in pids.items()}
        await loadgen.drive(call, requests, concurrency)
        await asyncio.sleep(1.0)  # the auditor and settlements finish what the answers left behind
        used = {k: round((cpu_s(v) - before[k]) * 1000 / requests, 3) for k, v in pids.items()}
        stored_after, delivered_after = await _stream_counts(nc)
        await nc.close()
    handed = {k: round((v - delivered.get(k, 0)) / requests, 2) for k, v in delivered_after.items()}
    print("deliveries per request by consumer: " + ", ".join(f"{k} {v}" for k, v in sorted(handed.items()) if v))
    return {**used, "total": round(sum(used.values()), 3),
            "stream_messages_per_request": round((stored_after - stored) / requests, 2),
            "deliveries_per_request": round(sum(handed.values()), 2)}


async def _stream_counts(nc: nats.NATS) -> tuple[int, dict[str, int]]:
    """Messages stored in the gateway's stream, and per consumer the messages it has been handed
    (ordered readers, which have no durable name, are summed as `readers`)."""
    jsm = nc.jsm()
    info = await jsm.stream_info(subjects.STREAM)
    handed: dict[str, int] = {}
    for c in await jsm.consumers_info(subjects.STREAM):
        name = c.config.durable_name or "readers"
        handed[name] = handed.get(name, 0) + (int(c.delivered.consumer_seq or 0) if c.delivered else 0)
    return int(info.state.messages), handed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no package registry reachable)")
    ap.add_argument("--no-profiles", action="store_true", help="skip the py-spy profiles")
    ap.add_argument("--profiles", default=str(HERE / "profiles"), help="where the profiles go")
    args = ap.parse_args()
    hot: dict[str, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp_name, fixed_gateway(Path(tmp_name)) as (gw, backend):
        tmp = Path(tmp_name)
        token = issuer.issue(tmp / "data" / "keys", subject="bench", team="bench", ttl_s=7200)
        results = asyncio.run(scenarios(gw, backend, token, args.requests, args.concurrency, tmp,
                                        not args.no_litellm))
        cpu = asyncio.run(cpu_per_request(gw, token, 32, args.requests))
        if not args.no_profiles:
            hot = asyncio.run(profiled(gw, token, 32, Path(args.profiles)))
    ratios = ratios_of(results)
    met = verdicts(ratios)
    print(f"\n{'system':16s} {'req/s':>9s}   {'p50 / p99 at 1 caller':>22s}   p50 / p99 at {args.concurrency} callers")
    for name, r in results.items():
        print(f"{name:16s} {r['rps']:9.1f}   {r['p50_ms']:9.2f} / {r['p99_ms']:7.2f} ms   "
              f"{r['p50_ms_loaded']:9.2f} / {r['p99_ms_loaded']:7.2f} ms")
    print()
    for name, v in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"   target {target[0]} {target[1]}: {'met' if met[name] else 'NOT met'}"
        print(f"{name:32s} {v:9.3f}{verdict}")
    floors = results["floor_5hop"]["cpu_ms_per_request"], results["floor_gateway_shaped"]["cpu_ms_per_request"]
    print(f"\nCPU ms per request of the floors (workers and broker): 5 hops {floors[0]}, "
          f"the gateway's message pattern {floors[1]}")
    print("CPU ms per request: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    for name, top in hot.items():
        print(f"{name:10s} " + ", ".join(f"{f} {share:.0%}" for f, share in top[:4]))
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "results": results,
                      "ratios": ratios, "targets_met": met, "cpu_ms_per_request": cpu, "hottest": hot,
                      "at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
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
