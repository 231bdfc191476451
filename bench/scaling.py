"""How the gateway scales on this machine (issue 14 item 4): throughput of the NATS path against
the number of replicas of every worker (1, 2, 4), throughput of the HTTP edge against the prompt's
size (1 KiB to 1 MiB), and each process's resident memory. Prints a table, writes a plot, and
ends with one line of JSON.
Usage: .venv/bin/python bench/scaling.py [--requests N] [--concurrency C] [--plot FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp
import msgspec
from enclave_gateway import issuer, procs, supervisor
from enclave_gateway.runtime import Gateway
from enclave_gateway.services import bus
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
from run import _poster as poster
from run import fixed_gateway, gateway_pids, nats_caller

HERE = Path(__file__).resolve().parent
SCALED = ("authz", "budget", "router", "invoker", "auditor")  # the edge holds the HTTP port: one
REPLICAS = (1, 2, 4)
SIZES_KIB = (1, 16, 64, 200, 1024)


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def memory(gw: Gateway) -> dict[str, float]:
    return {name: rss_mib(pid) for name, pid in gateway_pids(gw).items()}


async def by_replicas(gw: Gateway, token: str, requests: int, concurrency: int, progress: Progress
                      ) -> dict[int, dict[str, float]]:
    """The NATS path with n processes of each scaled worker (the extra ones share its consumer)."""
    out: dict[int, dict[str, float]] = {}
    extra: list[object] = []
    nc = await bus.connect(gw.settings, "app.bench")
    task = progress.add_task("replicas", total=len(REPLICAS))
    try:
        for n in REPLICAS:
            while len(extra) < (n - 1) * len(SCALED):
                i = len(extra) // len(SCALED) + 1
                name = SCALED[len(extra) % len(SCALED)]
                settings, log_name = gw.settings, f"{name}-replica{i}"
                if name == "auditor":  # its own Parquet files, as on a machine of its own; the deployment's keys
                    home = Path(gw.data_dir).parent / f"auditor-replica{i}"
                    shutil.copytree(Path(gw.data_dir) / "keys", home / "keys")
                    settings, log_name = msgspec.structs.replace(gw.settings, data_dir=str(home)), "auditor"
                proc = supervisor.spawn_worker(settings, name, log_name=log_name)
                procs.wait_for_line(Path(settings.data_dir) / "logs" / f"{log_name}.log", "consuming", proc, 60)
                extra.append(proc)
            out[n] = await loadgen.measure(nats_caller(nc, token), requests, concurrency)
            out[n]["processes"] = 1 + n * len(SCALED)
            out[n]["replica_rss_mib"] = sum(rss_mib(p.pid) for p in extra)  # type: ignore[attr-defined]
            progress.advance(task)
    finally:
        for proc in extra:
            procs.stop(proc)  # type: ignore[arg-type]
        await nc.close()
    return out


async def by_size(gw: Gateway, token: str, requests: int, concurrency: int, progress: Progress
                  ) -> dict[int, dict[str, object]]:
    """The HTTP edge with a prompt of each size; a size the edge refuses is recorded as refused."""
    out: dict[int, dict[str, object]] = {}
    task = progress.add_task("prompt sizes", total=len(SIZES_KIB))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        for kib in SIZES_KIB:
            body = {"model": "enclave-tiny", "max_tokens": 3,
                    "messages": [{"role": "user", "content": ("lorem ipsum " * (kib * 1024 // 12 + 1))[:kib * 1024]}]}
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{gw.http_url}/v1/chat/completions", json=body, headers=headers) as r:
                status, text = r.status, await r.text()
            if status != 200:
                out[kib] = {"refused": status, "why": text[:200]}
            else:
                call = poster(http, gw.http_url, headers, body)
                n = max(100, requests // max(1, kib // 4))
                out[kib] = {**await loadgen.measure(call, n, concurrency), "requests": n}
            out[kib]["memory_mib"] = memory(gw)
            progress.advance(task)
    return out


def plot(replicas: dict[int, dict[str, float]], sizes: dict[int, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(list(replicas), [r["rps"] for r in replicas.values()], marker="o")
    a.set(xlabel="processes per worker (authz, budget, router, invoker, auditor)", ylabel="req/s, NATS path",
          xticks=list(replicas), ylim=(0, None), title="Replicas on 2 cores")
    served = {k: v for k, v in sizes.items() if "rps" in v}
    b.plot(list(served), [float(v["rps"]) for v in served.values()], marker="o")  # type: ignore[arg-type]
    refused = [f"{kib} KiB: refused ({v['refused']})" for kib, v in sizes.items() if "refused" in v]
    if refused:
        b.text(0.97, 0.95, "\n".join(refused), transform=b.transAxes, ha="right", va="top", fontsize=9)
    b.set(xscale="log", xlabel="prompt size, KiB", ylabel="req/s, HTTP edge", ylim=(0, None),
          title="Prompt size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "performance" / "scaling.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-scale-") as tmp_name, fixed_gateway(Path(tmp_name)) as (gw, _), \
            Progress() as progress:
        token = issuer.issue(Path(tmp_name) / "data" / "keys", subject="bench", team="bench", ttl_s=7200)
        idle = memory(gw)
        replicas = asyncio.run(by_replicas(gw, token, args.requests, args.concurrency, progress))
        sizes = asyncio.run(by_size(gw, token, args.requests, min(args.concurrency, 16), progress))
    print(f"\n{'processes per worker':>22s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms (loaded)':>16s}")
    for n, r in replicas.items():
        print(f"{n:22d} {r['rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms_loaded']:16.2f}")
    print(f"\n{'prompt KiB':>10s} {'req/s':>8s} {'p50 ms':>8s}  edge / invoker / auditor RSS MiB")
    for kib, v in sizes.items():
        mem = v["memory_mib"]
        assert isinstance(mem, dict)
        rss = f"{mem.get('edge')} / {mem.get('invoker')} / {mem.get('auditor')}"
        if "refused" in v:
            print(f"{kib:10d} {'refused ' + str(v['refused']):>17s}  {rss}")
        else:
            print(f"{kib:10d} {v['rps']:8.1f} {v['p50_ms']:8.2f}  {rss}")
    print("\nresident memory at rest, MiB: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
    plot(replicas, sizes, Path(args.plot))
    print(f"plot: {args.plot}")
    print(json.dumps({"replicas": replicas, "sizes_kib": sizes, "memory_at_rest_mib": idle}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
