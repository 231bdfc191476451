"""Routing decisions per second on the shipped catalog: first routes of reserved requests, routes
that pass over an endpoint whose circuit is open, and retries and fallbacks decided from failed
attempts.
Prints figures and one JSON line.

Usage: .venv/bin/python bench/routing.py [--decisions N]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import BudgetReserved, Caller, InvocationFailed, RouteSelected, envelope
from enclave_gateway.services.invoker import decider as invoker
from enclave_gateway.services.policy import load_bundle
from enclave_gateway.services.router import decider as router

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def reserved(i: int) -> BudgetReserved:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=f"route {i}"),), max_tokens=8)
    return BudgetReserved(**envelope(f"r{i:09d}", "reserve", NOW, "bench"), team="bench", period="2026-11",
                          spent_micros=0, reserved_micros=100, cap_micros=10**9,
                          caller=Caller(subject="s", team="bench"), model_id="enclave-tiny", amount_micros=100,
                          max_tokens=8, chat=chat, reply_to="")


def rate(label: str, inputs: list[BudgetReserved] | list[InvocationFailed], states: list[router.RouterState],
         check: str) -> float:
    policy = load_bundle(ROOT / "policies")
    t0 = time.perf_counter()
    for event, state in zip(inputs, states, strict=True):
        [decided] = router.decide(event, state, policy, NOW)
        assert isinstance(decided, RouteSelected) and decided.endpoint == check, decided
    per_s = len(inputs) / (time.perf_counter() - t0)
    print(f"{label:34} {per_s:>12,.0f} decisions/s")
    return round(per_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--decisions", type=int, default=50_000)
    n = ap.parse_args().decisions
    policy = load_bundle(ROOT / "policies")
    asks = [reserved(i) for i in range(n)]
    first = rate("first route", asks, [router.initial_state()] * n, "local-llama")
    failing = router.Breaker(failures=tuple((NOW, f"f{i}") for i in range(policy.catalog.routing.breaker_failures)))
    around = rate("first route, circuit open", asks, [router.RouterState(breakers={"local-llama": failing})] * n,
                  "local-llama-2")
    routes = [router.decide(a, router.initial_state(), policy, NOW)[0] for a in asks]
    states = [router.RouterState(routes=router.Routes().add(r)) for r in routes if isinstance(r, RouteSelected)]
    outcomes = {"retry": invoker.CallFailed(error="unreachable", detail="", latency_ms=1.0),
                "fallback": invoker.CallFailed(error="unknown_endpoint", detail="", latency_ms=1.0)}
    figures = {}
    for kind, outcome in outcomes.items():
        failures = [invoker.decide(r, outcome, "bench", NOW)[0] for r in routes if isinstance(r, RouteSelected)]
        figures[kind] = rate(f"{kind} after a failed attempt", failures, states,  # type: ignore[arg-type]
                             "local-llama" if kind == "retry" else "local-llama-2")
    print(json.dumps({"decisions": n, "first_route_per_s": first, "circuit_open_per_s": around,
                      "retry_per_s": figures["retry"], "fallback_per_s": figures["fallback"]}))


if __name__ == "__main__":
    main()
