"""The broker's resident memory against the messages stored (issue 11's soak: nats-server kept
growing after its duplicate window had filled). One nats-server per case, a stream shaped as
GW_EVENTS (file storage, no limits, our duplicate window or one of a second), messages of the
soak's size published with a `Nats-Msg-Id` each; RSS and the server's own heap figure (`/varz`)
printed every step, then one line of JSON.

Usage: .venv/bin/python bench/broker_memory.py [--messages 400000] [--step 50000] [--size 900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import nats
from enclave_gateway import procs
from enclave_gateway.broker import Broker
from enclave_gateway.services.bus import DUPLICATE_WINDOW_S
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from rich.progress import Progress

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from soak import rss_mib  # noqa: E402 (a script beside this one)


def varz(port: int) -> dict[str, float]:
    """The server's own figure of its memory, from the monitoring port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as r:
        body = json.load(r)
    return {"mem_mib": round(body["mem"] / 2**20, 1)}


async def fill(url: str, messages: int, step: int, size: int, window_s: float, broker: Broker, http_port: int,
               progress: Progress, label: str) -> list[dict[str, object]]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="GW_MEM", subjects=["mem.>"], storage=StorageType.FILE,
                                     duplicate_window=window_s, discard=DiscardPolicy.NEW, allow_direct=True))
    payload = b"x" * size
    rows: list[dict[str, object]] = []
    task = progress.add_task(label, total=messages)
    assert broker.proc is not None
    sent = 0
    while sent < messages:
        acks = [js.publish(f"mem.evt.{i % 20}", payload, headers={"Nats-Msg-Id": f"{i:032x}:stage{i % 7}"})
                for i in range(sent, min(messages, sent + step))]
        for i in range(0, len(acks), 500):  # bounded in flight
            await asyncio.gather(*acks[i:i + 500])
        sent += len(acks)
        progress.update(task, completed=sent)
        rows.append({"messages": sent, "rss_mib": round(rss_mib(broker.proc.pid), 1), **varz(http_port)})
    await nc.close()
    return rows


def one_case(window_s: float, args: argparse.Namespace, progress: Progress) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="gw-brokermem-") as tmp:
        http_port = procs.free_port()
        broker = Broker(Path(tmp))
        text = broker.config_text()
        broker.config_text = lambda: text + f"http_port: {http_port}\n"  # type: ignore[method-assign]
        url = broker.start()
        try:
            return asyncio.run(fill(url, args.messages, args.step, args.size, window_s, broker, http_port, progress,
                                    f"duplicate window {window_s:g} s"))
        finally:
            broker.stop()


def slope(rows: list[dict[str, object]]) -> float:
    """RSS growth per 100,000 messages, from the first step to the last."""
    if len(rows) < 2:
        return 0.0
    first, last = rows[0], rows[-1]
    grew = float(last["rss_mib"]) - float(first["rss_mib"])  # type: ignore[arg-type]
    return round(grew / (int(last["messages"]) - int(first["messages"])) * 100_000, 2)  # type: ignore[call-overload]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=400_000)
    ap.add_argument("--step", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=900, help="bytes a message (the soak's events are about this)")
    args = ap.parse_args()
    out: dict[str, list[dict[str, object]]] = {}
    with Progress() as progress:
        for window in (DUPLICATE_WINDOW_S, 1.0):
            out[f"{window:g}"] = rows = one_case(window, args, progress)
            for row in rows:
                progress.console.print(f"window {window:g} s: {row}")
    slopes = {f"mib_per_100k_msgs_window_{w}": slope(rows) for w, rows in out.items()}
    for name, figure in slopes.items():
        print(f"{name}: {figure}")
    print(json.dumps({"messages": args.messages, "size": args.size, **slopes, "cases": json.dumps(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
