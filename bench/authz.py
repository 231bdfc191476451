"""Authorization decisions per second: EdDSA token verification plus the casbin rules, with and
without the verified-token cache, on the shipped policy bundle. Prints figures and one JSON line.

Usage: .venv/bin/python bench/authz.py [--decisions N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from enclave_gateway import issuer
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import RequestSubmitted
from enclave_gateway.services.authz import decider
from enclave_gateway.services.authz.access import AccessRules
from enclave_gateway.services.authz.tokens import TokenCache, keyring
from enclave_gateway.services.policy import load_bundle
from enclave_gateway.services.settings import jwks_path

ROOT = Path(__file__).resolve().parent.parent


def run(policy: decider.AuthzPolicy, cmds: list[RequestSubmitted], now: datetime) -> dict[str, float]:
    state = decider.initial_state()
    lat = []
    t0 = time.perf_counter()
    for cmd in cmds:
        t = time.perf_counter()
        decider.decide(cmd, state, policy, now)
        lat.append((time.perf_counter() - t) * 1e6)
    total = time.perf_counter() - t0
    lat.sort()
    return {"per_s": round(len(cmds) / total, 1), "p50_us": round(statistics.median(lat), 1),
            "p99_us": round(lat[int(len(lat) * 0.99) - 1], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=50, help="distinct tokens (callers reuse their session)")
    args = ap.parse_args()
    keys = Path(tempfile.mkdtemp()) / "keys"
    issuer.ensure_keys(keys)
    bundle = load_bundle(ROOT / "policies")
    base = decider.AuthzPolicy(bundle=bundle, rules=AccessRules(bundle), keys=keyring([jwks_path(keys).read_text()]))
    now = datetime.now(UTC)
    tokens = [issuer.issue(keys, subject=f"u{i}", team="alpha", clearance="SECRET", compartments=("SI",),
                           caveats=("NOFORN",)) for i in range(args.sessions)]
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="x"),))
    cmds = [RequestSubmitted(event_id=f"r{i}:submit", request_id=f"r{i}", occurred_at=now, policy_version="p",
                             entry="nats", token=tokens[i % len(tokens)], chat=chat, reply_to="",
                             input_label="SECRET//SI", output_label="SECRET//SI") for i in range(args.decisions)]
    denied = [msgspec.structs.replace(c, output_label="UNCLASSIFIED") for c in cmds]
    results = {
        "allow_uncached": run(base, cmds, now),
        "allow_cached": run(msgspec.structs.replace(base, tokens=TokenCache()), cmds, now),
        "deny_write_down_cached": run(msgspec.structs.replace(base, tokens=TokenCache()), denied, now),
    }
    for name, r in results.items():
        print(f"{name:24s} {r['per_s']:10.1f} decisions/s   p50 {r['p50_us']:8.1f} µs   p99 {r['p99_us']:8.1f} µs")
    speedup = round(results["allow_cached"]["per_s"] / results["allow_uncached"]["per_s"], 2)
    print(f"cache speed-up {speedup}x ({args.sessions} sessions reused over {args.decisions} decisions)")
    print(json.dumps({"decisions": args.decisions, "sessions": args.sessions, "results": results,
                      "cache_speedup": speedup}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
