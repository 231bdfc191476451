"""`gateway report spend`: where the AI budget went, from the Parquet audit, reconciled to the
micro-unit against the budget ledger's own state."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Literal

from . import audit_sql
from .services import bus
from .services.budget.ledger_store import LedgerStore
from .services.settings import WorkerSettings
from .supervisor import read_settings

By = Literal["team", "model", "day"]
GROUP = {"team": "team", "model": "model_id", "day": "strftime(occurred_at, '%Y-%m-%d')"}


def spend(audit_dir: Path, by: By, since: str | None = None) -> tuple[list[str], list[tuple[object, ...]]]:
    """Settled spend grouped by team, model or day: micro-units, calls and tokens."""
    where = "type = 'BudgetSettled'"
    if since:
        where += f" AND occurred_at >= TIMESTAMPTZ '{datetime.fromisoformat(since).isoformat()}'"
    sql = (
        f"SELECT {GROUP[by]} AS {by}, sum(charged_micros) AS spent_micros, count(*) AS calls, "
        "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens "
        f"FROM events WHERE {where} GROUP BY 1 ORDER BY 1"
    )
    return audit_sql.query(audit_dir, sql)


def refusals(audit_dir: Path, since: str | None = None) -> tuple[list[str], list[tuple[object, ...]]]:
    """Every refusal by team, code and the rule or limit that refused: authz denials, budget caps,
    rate limits (issue 12: every refusal is an event, and counted here)."""
    where = "type IN ('RequestDenied', 'BudgetRejected')"
    if since:
        where += f" AND occurred_at >= TIMESTAMPTZ '{datetime.fromisoformat(since).isoformat()}'"
    sql = (
        "SELECT coalesce(team, '(unknown)') AS team, reason, "
        "coalesce(rule, CASE WHEN type = 'BudgetRejected' THEN 'team-spend-cap' END) AS rule, "
        f"count(*) AS refusals FROM events WHERE {where} GROUP BY 1, 2, 3 ORDER BY 1, 4 DESC"
    )
    return audit_sql.query(audit_dir, sql)


TIMELINE = ("seq", "occurred_at", "type", "policy_version", "team", "caller", "model_id", "endpoint", "rule",
            "reason", "amount_micros", "charged_micros", "prompt_tokens", "completion_tokens", "latency_ms", "outcome",
            "input_label", "output_label", "prompt_hmac", "completion_hmac")


def timeline(audit_dir: Path, request_id: str) -> tuple[list[str], list[tuple[object, ...]]]:
    """Every audited event of one request, in stream order: its decisions, the policy version each
    was made under, its route and its charge; keyed digests of the prompt and answer, never text."""
    if not any((audit_dir / "events").glob("day=*/*.parquet")):
        return list(TIMELINE), []
    return audit_sql.query(audit_dir, f"SELECT {', '.join(TIMELINE)} FROM events WHERE request_id = ? ORDER BY seq",
                           [request_id])


def audited_spend_by_period(audit_dir: Path) -> dict[tuple[str, str], int]:
    """Sum of charges per (team, budget period) in the Parquet audit."""
    _, rows = audit_sql.query(
        audit_dir, "SELECT team, period, sum(charged_micros) FROM events WHERE type = 'BudgetSettled' GROUP BY 1, 2"
    )
    return {(str(t), str(p)): int(str(s)) for t, p, s in rows}


def recorded_ledger_state(audit_dir: Path) -> dict[tuple[str, str], int]:
    """Spent per (team, period) as the newest ledger row of each says (when no gateway is running)."""
    _, rows = audit_sql.query(
        audit_dir,
        "SELECT team, period, arg_max(spent_micros, seq) FROM events "
        "WHERE type IN ('BudgetReserved', 'BudgetSettled', 'BudgetReleased', "
        "'BudgetThresholdCrossed') GROUP BY 1, 2",
    )
    return {(str(t), str(p)): int(str(s)) for t, p, s in rows}


async def live_ledger_state(data_dir: Path, settings: WorkerSettings | None = None) -> dict[tuple[str, str], int]:
    """Spent per (team, period) from the budget projection rebuilt off the running stream (the data
    dir's gateway, or the bus `settings` reach)."""
    settings = settings or read_settings(data_dir)
    nc = await bus.connect(settings, "admin", keep_trying=False)
    try:
        store = LedgerStore(nc.jetstream())
        await store.rebuild()
        return {tuple(key.split("/", 1)): t.spent for key, t in store.state.ledgers.items()}  # type: ignore[misc]
    finally:
        await nc.close()


def reconcile(data_dir: Path) -> tuple[str, list[tuple[str, str, int, int]]]:
    """Compare audited spend with the budget state; returns the source used and any mismatches."""
    audit_dir = data_dir / "audit"
    try:
        state, source = asyncio.run(asyncio.wait_for(live_ledger_state(data_dir), 15)), "live budget ledger"
    except Exception:  # no running gateway: the ledger's recorded post-state is the budget state
        state, source = recorded_ledger_state(audit_dir), "ledger state recorded in the audit"
    return source, compare(audited_spend_by_period(audit_dir), state)


def compare(audited: dict[tuple[str, str], int], state: dict[tuple[str, str], int]) -> list[tuple[str, str, int, int]]:
    """(team, period, audited, budget state) wherever the two disagree by even one micro-unit."""
    keys = sorted(set(audited) | set(state))
    return [
        (t, p, audited.get((t, p), 0), state.get((t, p), 0))
        for t, p in keys
        if audited.get((t, p), 0) != state.get((t, p), 0)
    ]


def caps(audit_dir: Path) -> dict[str, int]:
    """Each team's cap as its newest ledger row records it."""
    _, rows = audit_sql.query(
        audit_dir,
        "SELECT team, arg_max(cap_micros, seq) FROM events "
        "WHERE type IN ('BudgetReserved', 'BudgetSettled', 'BudgetReleased') GROUP BY 1",
    )
    return {str(t): int(str(c)) for t, c in rows}


def plot(
    cols: list[str], rows: list[tuple[object, ...]], by: By, path: Path, team_caps: dict[str, int] | None = None
) -> Path:
    """Spend by the grouping (currency units) as PNG; by team, also each team's share of its cap."""
    import matplotlib

    matplotlib.use("Agg")  # no display in an enclave server room
    import matplotlib.pyplot as plt

    labels = [str(r[0]) for r in rows]
    spent = [int(str(r[1])) for r in rows]
    width = max(6.0, 0.6 * len(labels) + 3)
    fig, axes = plt.subplots(1, 2 if team_caps else 1, figsize=(width * (2 if team_caps else 1), 4), squeeze=False)
    ax = axes[0][0]
    bars = ax.bar(labels, [v / 1_000_000 for v in spent], color="#2b6cb0")
    ax.bar_label(bars, labels=[f"{v / 1_000_000:,.6f}" for v in spent], fontsize=8)
    ax.set(xlabel=by, ylabel="spent (currency units)", title=f"AI spend by {by}")
    if by != "team":
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    if team_caps:
        share = [100.0 * v / team_caps[t] if team_caps.get(t) else 0.0 for t, v in zip(labels, spent, strict=True)]
        right = axes[0][1]
        colors = ["#c53030" if p >= 80 else "#2b6cb0" for p in share]
        pbars = right.bar(labels, share, color=colors)
        right.bar_label(pbars, labels=[f"{p:.1f}%" for p in share], fontsize=8)
        right.axhline(100, color="#c53030", linestyle="--", linewidth=1, label="cap")
        right.set(
            xlabel="team",
            ylabel="spend in range, % of the period cap",
            title="Spend against each team's cap",
            ylim=(0, max(110.0, *share)),
        )
        right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
