"""Budget decisions per second (the pure decider), and the race: N concurrent reservations against
one cap by two replicas writing with compare-and-set on a real nats-server. Prints the figures
(and the overshoot, which must be 0), ending with one line of JSON.

Usage: .venv/bin/python bench/budget.py [--requests N] [--cap-requests K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
from enclave_gateway.broker import Broker
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import BudgetReserved, Caller, InvocationCompleted, RequestAuthorized, Reservation
from enclave_gateway.schemas.policy import Budgets, PolicyBundle, TeamBudget
from enclave_gateway.services import bus, worker
from enclave_gateway.services.budget import decider
from enclave_gateway.services.budget.ledger_store import LedgerStore
from enclave_gateway.services.budget.shell import apply
from enclave_gateway.services.policy import load_bundle

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC)
CHAT = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="bench"),), max_tokens=4)


def authorized(i: int) -> RequestAuthorized:
    return RequestAuthorized(event_id=f"r{i}:authz", request_id=f"r{i}", occurred_at=NOW, policy_version="p",
                             caller=Caller(subject="s", team="bench"), model_id="enclave-tiny", chat=CHAT, reply_to="")


def policy(cap: int) -> PolicyBundle:
    base = load_bundle(ROOT / "policies")
    return msgspec.structs.replace(base, budgets=Budgets(teams={"bench": TeamBudget(cap_micros=cap)}))


def decider_rate(n: int) -> dict[str, float]:
    """Reserve then settle n requests through decide/evolve alone."""
    pol, state = policy(10**15), decider.initial_state()
    t0 = time.perf_counter()
    for i in range(n):
        [reserved, *_] = decider.decide(authorized(i), state, pol, NOW)
        state = decider.evolve(state, reserved)
        assert isinstance(reserved, BudgetReserved)
        held = Reservation(team="bench", period=reserved.period, micros=reserved.amount_micros)
        done = InvocationCompleted(event_id=f"r{i}:invoke", request_id=f"r{i}", occurred_at=NOW, policy_version="p",
                                   caller=reserved.caller, model_id="enclave-tiny", endpoint="e", prompt_tokens=10,
                                   completion_tokens=4, finish_reason="length", content="", latency_ms=1.0,
                                   reservation=held, reply_to="")
        for fact in decider.decide(done, state, pol, NOW):
            state = decider.evolve(state, fact)
    secs = time.perf_counter() - t0
    return {"decisions_per_s": round(2 * n / secs, 1), "requests": n}


async def race(url: str, requests: int, cap_requests: int) -> dict[str, float]:
    """Two replicas, each its own connection and projection, draining one queue of reservations."""
    one = decider.decide(authorized(0), decider.initial_state(), policy(10**15), NOW)[0]
    assert isinstance(one, BudgetReserved)
    cap = one.amount_micros * cap_requests
    pol = policy(cap)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    conflicts = [0, 0]

    async def replica(k: int) -> None:
        nc = await nats.connect(url)
        session = worker.Session(nc=nc, js=nc.jetstream(), feed=None)
        store = LedgerStore(session.js)
        write = store.write

        async def counting(event):  # type: ignore[no-untyped-def]
            try:
                await write(event)
            except Exception:
                conflicts[k] += 1
                raise

        store.write = counting  # type: ignore[method-assign]
        while not queue.empty():
            i = queue.get_nowait()
            await apply(session, store, "bench", lambda i=i: decider.decide(authorized(i), store.state, pol, NOW))  # type: ignore[misc]
        await nc.close()

    t0 = time.perf_counter()
    await asyncio.gather(replica(0), replica(1))
    secs = time.perf_counter() - t0
    nc = await nats.connect(url)
    check = LedgerStore(nc.jetstream())
    await check.rebuild()
    await nc.close()
    totals = next(iter(check.state.ledgers.values()))
    return {"requests": requests, "cap_admits": cap_requests, "reserved": len(check.state.open),
            "overshoot_micros": max(0, totals.spent + totals.reserved - cap), "conflicts": sum(conflicts),
            "requests_per_s": round(requests / secs, 1)}


async def rebuild(url: str, events: int) -> dict[str, float]:
    """Start-up time of a budget replica over `events` ledger events: full replay vs snapshot + tail."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    pol, state = policy(10**15), decider.initial_state()
    for i in range(events):
        [fact, *_] = decider.decide(authorized(10_000_000 + i), state, pol, NOW)
        state = decider.evolve(state, fact)
        await bus.publish_ack(js, fact)  # type: ignore[arg-type]
    tail = min(1000, events // 10)
    store = LedgerStore(js)
    t0 = time.perf_counter()
    await store.rebuild()
    full = time.perf_counter() - t0
    store.seq = max(0, store.seq - tail)  # a snapshot taken `tail` events ago
    await store.save_snapshot()
    t0 = time.perf_counter()
    await LedgerStore(js).rebuild()
    resumed = time.perf_counter() - t0
    await nc.close()
    return {"ledger_events": events, "full_replay_s": round(full, 3), "snapshot_plus_tail_s": round(resumed, 3),
            "tail_events": tail, "full_replay_events_per_s": round(events / full, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--cap-requests", type=int, default=100, help="how many worst cases the cap admits")
    ap.add_argument("--rebuild-events", type=int, default=20_000, help="ledger size for the start-up figure")
    args = ap.parse_args()
    pure = decider_rate(5000)
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        url = broker.start()
        try:
            asyncio.run(_topology(url))
            raced = asyncio.run(race(url, args.requests, args.cap_requests))
            started = asyncio.run(rebuild(url, args.rebuild_events))
        finally:
            broker.stop()
    print(f"decider alone      {pure['decisions_per_s']:10.1f} decisions/s (reserve + settle)")
    print(f"race, 2 replicas   {raced['requests_per_s']:10.1f} requests/s, {raced['conflicts']} CAS conflicts")
    print(f"admitted {raced['reserved']} of {raced['requests']} against a cap for {raced['cap_admits']}; "
          f"overshoot {raced['overshoot_micros']} micros")
    print(f"start-up over {started['ledger_events']} ledger events: full replay {started['full_replay_s']} s "
          f"({started['full_replay_events_per_s']}/s), snapshot + {started['tail_events']} events "
          f"{started['snapshot_plus_tail_s']} s")
    print(json.dumps({"decider": pure, "race": raced, "rebuild": started}))
    return 0 if raced["overshoot_micros"] == 0 else 1


async def _topology(url: str) -> None:
    nc = await nats.connect(url)
    await bus.ensure_topology(nc.jetstream())
    await nc.close()


if __name__ == "__main__":
    raise SystemExit(main())
