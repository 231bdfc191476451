"""The edge's Prometheus metrics (issue 11 item 10): what callers were told, how long they waited
and how much of that the gateway itself added, each team's spend against its cap, which endpoints'
circuits the router found open, the consumers' backlog and the supervisor's restarts, served at
GET /metrics.

Each edge replica counts the callers it answered (Prometheus scrapes every replica and sums). Label
values come only from bounded sets: a model the catalog names (any other is `other`, so a caller
cannot grow the series without bound), a team the token verified, our reason codes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ...schemas.commands import SubmitReply
from ...schemas.reasons import HTTP_STATUS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EdgeMetrics:
    """One replica's registry (not the process-global one: tests run several edges in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("enclave_gateway_requests", "Requests answered, by what the caller was told",
                                ["entry", "model", "team", "outcome", "code"], registry=self.registry)
        self.seconds = Histogram("enclave_gateway_request_seconds", "Time from submission to the answer (HTTP)",
                                 ["model", "outcome"], buckets=BUCKETS, registry=self.registry)
        self.added = Histogram("enclave_gateway_added_seconds",
                               "Time the gateway added to an answer: the caller's wait less the model call (HTTP)",
                               ["model"], buckets=BUCKETS, registry=self.registry)
        self.spent = Gauge("enclave_gateway_budget_spent_micros", "Settled spend of the team's current period",
                           ["team"], registry=self.registry)
        self.reserved = Gauge("enclave_gateway_budget_reserved_micros", "Money held by requests in flight",
                              ["team"], registry=self.registry)
        self.cap = Gauge("enclave_gateway_budget_cap_micros", "The team's hard cap for the period",
                         ["team"], registry=self.registry)
        self.circuit = Gauge("enclave_gateway_circuit_open",
                             "1 when the router's newest decision for the model passed the endpoint over as failing",
                             ["model", "endpoint"], registry=self.registry)
        self.pending = Gauge("enclave_gateway_consumer_pending", "Messages not yet delivered to a stage",
                             ["consumer"], registry=self.registry)
        self.unacked = Gauge("enclave_gateway_consumer_ack_pending", "Messages delivered and not yet acknowledged",
                             ["consumer"], registry=self.registry)
        self.redelivered = Gauge("enclave_gateway_consumer_redelivered", "Messages delivered more than once",
                                 ["consumer"], registry=self.registry)
        self.connected = Gauge("enclave_gateway_bus_connected", "1 while this edge is connected to NATS",
                               registry=self.registry)
        self.restarts = Gauge("enclave_gateway_process_restarts", "Restarts by the supervisor of `gateway up`",
                              ["process"], registry=self.registry)
        self.running = Gauge("enclave_gateway_process_running", "1 while the supervised process runs",
                             ["process"], registry=self.registry)
        self.hung_kills = Gauge("enclave_gateway_process_hung_kills",
                                "Workers killed by the supervisor for giving no sign of life (then restarted)",
                                ["process"], registry=self.registry)

    def answered(self, entry: str, model: str, known_models: Iterable[str], team: str | None,
                 known_teams: Iterable[str], reply: SubmitReply, seconds: float | None = None) -> None:
        """Count one caller's answer (and, for HTTP callers, how long it took). A model, team or
        code outside the policy's and our own lists is `other`: a terminal event forged with any
        service credential names what it likes (a review grew 600 series that way)."""
        named = model if model in set(known_models) else "other"
        outcome = "completed" if reply.completion is not None else "error"
        code = reply.error.code if reply.error is not None else ""
        code = code if not code or code in HTTP_STATUS else "other"
        team_label = "" if not team else team if team in set(known_teams) else "other"
        self.requests.labels(entry, named, team_label, outcome, code).inc()
        if seconds is not None:
            self.seconds.labels(named, outcome).observe(seconds)

    def added_time(self, model: str, known_models: Iterable[str], waited_s: float, model_s: float) -> float | None:
        """One completed HTTP answer: what the caller waited beyond the model call itself (returned too,
        for the answer's `x-gw-overhead-ms`; None when the invoker's figure is not a number)."""
        named = model if model in set(known_models) else "other"
        if not math.isfinite(model_s):
            return None
        added = waited_s - min(max(model_s, 0.0), waited_s)  # an invoker's figure, bounded by the wait
        self.added.labels(named).observe(added)
        return added

    def budgets(self, rows: Iterable[tuple[str, int, int, int]]) -> None:
        """Per team of the policy: spent, reserved and cap of its current period."""
        for team, spent, reserved, cap in rows:
            self.spent.labels(team).set(spent)
            self.reserved.labels(team).set(reserved)
            self.cap.labels(team).set(cap)

    def circuits(self, rows: Iterable[tuple[str, str, bool]]) -> None:
        """Per (model, endpoint) of the catalog: open as of the router's newest route for the model."""
        for model, endpoint, is_open in rows:
            self.circuit.labels(model, endpoint).set(1 if is_open else 0)

    def consumers(self, rows: Iterable[tuple[str, int, int, int]]) -> None:
        """Per durable: pending, unacked, redelivered (read from the server at scrape time)."""
        for name, pending, unacked, redelivered in rows:
            self.pending.labels(name).set(pending)
            self.unacked.labels(name).set(unacked)
            self.redelivered.labels(name).set(redelivered)

    def supervised(self, counts_file: Path) -> None:
        """The supervisor's counts, when this edge runs under `gateway up` on this machine."""
        try:
            counts = json.loads(counts_file.read_text())
        except (OSError, ValueError):
            return
        for process, row in counts.items():
            self.restarts.labels(process).set(int(row.get("restarts", 0)))
            self.running.labels(process).set(1 if row.get("running") else 0)
            self.hung_kills.labels(process).set(int(row.get("hung_kills", 0)))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
