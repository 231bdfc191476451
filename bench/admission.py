"""Admission controls (issue 12): the content-marking guard's cost per KiB of prompt, and rate-limit
decisions per second, both pure and counted on a real nats-server's JetStream counters by two
racing clients (the admitted count must equal the limit). Prints the figures, then one line of JSON.

Usage: .venv/bin/python bench/admission.py [--kib 64] [--decisions 20000] [--counted 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
from enclave_gateway.broker import Broker
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import Caller, RequestAuthorized
from enclave_gateway.schemas.policy import Admission, Budgets, PolicyBundle, RateLimit, TeamBudget
from enclave_gateway.services import bus
from enclave_gateway.services.authz import markings
from enclave_gateway.services.budget import counters, decider, rates
from enclave_gateway.services.policy import load_bundle

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the", "convoy", "leaves", "at", "dawn", "report", "logistics", "summary", "secret", "(c)", "item(s)")


def prose(kib: int, marked: bool, seed: int = 7) -> str:
    """About `kib` KiB of text in lines, with a portion marking every 40 lines when `marked`."""
    rng, lines, size = random.Random(seed), [], 0
    while size < kib * 1024:
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        if marked and len(lines) % 40 == 0:
            line = "(S//NF) " + line
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def guard_cost(kib: int, rounds: int = 20) -> dict[str, float]:
    """Microseconds of `markings.scan` per KiB, on unmarked and on marked prose, and on non-ASCII text."""
    out: dict[str, float] = {}
    for name, text in (("plain", prose(kib, False)), ("marked", prose(kib, True)),
                       ("non_ascii", prose(kib, True).replace("e", "\u00e9"))):
        t0 = time.perf_counter()
        for _ in range(rounds):
            markings.scan([text])
        out[f"guard_{name}_us_per_kib"] = round((time.perf_counter() - t0) / rounds / kib * 1e6, 2)
    return out


def policy(rpm: int) -> PolicyBundle:
    base = load_bundle(ROOT / "policies")
    return msgspec.structs.replace(base, budgets=Budgets(teams={"bench": TeamBudget(cap_micros=10**15)}),
                                   admission=Admission(team={"bench": RateLimit(requests_per_minute=rpm,
                                                                                tokens_per_minute=10**9)}))


def authorized(i: int) -> RequestAuthorized:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="bench"),), max_tokens=4)
    return RequestAuthorized(event_id=f"r{i}:authz", request_id=f"r{i}", occurred_at=datetime.now(UTC),
                             policy_version="p", caller=Caller(subject="s", team="bench"), model_id="enclave-tiny",
                             chat=chat, reply_to="")


def pure_decisions(n: int) -> dict[str, float]:
    """to_count and decide with counts read, n times (no I/O)."""
    pol, state, now = policy(10**9), decider.initial_state(), datetime.now(UTC)
    t0 = time.perf_counter()
    for i in range(n):
        event = authorized(i)
        todo = rates.to_count(event, pol, now, decider.token_bound(event, pol))
        read = tuple(msgspec.structs.replace(c, observed=c.counted) for c in todo)
        decider.decide(event, state, pol, now, read)
    return {"rate_decisions_per_s": round(n / (time.perf_counter() - t0), 1)}


async def counted(url: str, n: int, rpm: int) -> dict[str, float]:
    """Two clients race n requests through the JetStream counters of one limit: counts/s, admitted."""
    pol = policy(rpm)
    ncs = [await nats.connect(url) for _ in range(2)]
    await bus.ensure_topology(ncs[0].jetstream())
    await bus.ensure_rate_counters(ncs[0].jetstream())  # made when a bundle with limits is activated
    queue = list(range(n))
    admitted = [0, 0]

    async def client(k: int) -> None:
        js = ncs[k].jetstream()
        while queue:
            event = authorized(queue.pop())
            todo = rates.to_count(event, pol, datetime.now(UTC), decider.token_bound(event, pol))
            taken = await counters.take(js, todo)
            if rates.refusal(taken) is None:
                admitted[k] += 1
            else:
                await counters.give(js, rates.give_back_refused(taken, datetime.now(UTC)))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(2)), *(client(k) for k in range(2)))
    secs = time.perf_counter() - t0
    for nc in ncs:
        await nc.close()
    return {"counted_requests": n, "rpm_limit": rpm, "admitted": sum(admitted),
            "counted_decisions_per_s": round(n / secs, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kib", type=int, default=64, help="prompt size for the guard's cost")
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--counted", type=int, default=2000, help="requests counted on the real counters")
    args = ap.parse_args()
    figures: dict[str, float] = {**guard_cost(args.kib), **pure_decisions(args.decisions)}
    second = time.gmtime().tm_sec
    if second > 50:  # the race must fit one minute's window to show the limit exactly
        time.sleep(61 - second)
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        url = broker.start()
        try:
            figures.update(asyncio.run(counted(url, args.counted, rpm=args.counted // 4)))
        finally:
            broker.stop()
    for k, v in figures.items():
        print(f"{k:>32}: {v}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
