"""The evidence package's validation document (issue 9 items 6-7, in part): Markdown and HTML with
plots, each figure computed from the package's own audit tables, and the map from NIST SP 800-53
rev5 controls to where the package evidences them."""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import msgspec

from .replay import package as pkg
from .replay import tables

# (control, what it asks, where this package evidences it)
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ("AU-2", "Event logging: the events the system logs",
     f"`{pkg.STREAM}`: every request, decision, reservation, route, invocation, delivery, refusal and policy "
     "activation is an event in the immutable stream; `audit/events` is its row form"),
    ("AU-3", "Content of audit records: what, when, where, source, outcome, identity",
     "`audit/events` columns: type, occurred_at, subject, caller, team, model, reason, rule, outcome, "
     "policy_version, labels"),
    ("AU-9(3)", "Protection of audit information: cryptographic protection",
     f"the hash chain over `{pkg.STREAM}`, the Ed25519-signed checkpoints (`{pkg.CHECKPOINTS}`), and "
     f"`{pkg.MANIFEST_SIG}` over `{pkg.MANIFEST}`; `gateway evidence verify` recomputes and checks them"),
    ("AU-10", "Non-repudiation",
     f"checkpoints and the manifest are signed by the audit signer named in `{pkg.REGISTER}`; every policy "
     "activation carries its signer's signature and key id"),
    ("AU-11", "Audit record retention",
     "the stream GW_EVENTS denies deletes and purges; this package is a retained, verifiable copy"),
    ("AU-12", "Audit record generation by every component",
     "each service (edge, authz, budget, router, invoker, auditor) publishes its own facts under its own "
     "NKey identity; `gateway identities` lists who may write what"),
    ("AC-3", "Access enforcement",
     "RequestAuthorized / RequestDenied rows with the rule that fired; the policy versions in force in "
     f"`{pkg.REGISTER}`"),
    ("AC-4", "Information flow enforcement",
     f"denials by rule `no-write-down` in `{pkg.VIOLATIONS_CSV}` (classified input to a lower output channel)"),
    ("AC-16", "Security and privacy attributes",
     "input and output labels and the caller's clearance on every decision row; model accreditation in "
     f"the catalog of `{pkg.REGISTER}`"),
)


def write(root: Path, period: str | None = None) -> list[Path]:
    """Write validation.md, validation.html and the plots (of the period's days) into the package folder."""
    replayed = msgspec.json.decode((root / pkg.REPLAY).read_bytes(), type=pkg.ReplaySummary)
    figures = _figures(root, period, replayed)
    counts = _counts(root, period)
    counts["replay"] = (f"{replayed.reproduced} of {replayed.decisions} recorded decisions reproduced by replay "
                        f"with the policy each was made under; {len(replayed.mismatches)} mismatch(es)"
                        + "".join(f"; {m}" for m in replayed.mismatches[:10]))
    md = _markdown(counts, figures)
    (root / "validation.md").write_text(md)
    (root / "validation.html").write_text(_html(counts, figures))
    return [root / "validation.md", root / "validation.html", *figures.values()]


def _query(root: Path, sql: str, period: str | None = None) -> list[tuple[object, ...]]:
    events = root / pkg.AUDIT / "events"
    if not any(events.glob("day=*/*.parquet")):
        return []
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{events}/day=*/*.parquet', "
                    f"hive_partitioning=false, union_by_name=true) WHERE {tables.in_period(period)}")
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _counts(root: Path, period: str | None) -> dict[str, object]:
    rows = _query(root, "SELECT count(*), count(*) FILTER (type = 'RequestDenied'), "
                        "count(*) FILTER (type = 'AuditCheckpoint'), min(seq), max(seq) FROM events", period)
    total, denied, checkpoints, first, last = rows[0] if rows else (0, 0, 0, None, None)
    return {"events": total, "denials": denied, "checkpoints": checkpoints, "first": first, "last": last}


def _figures(root: Path, period: str | None, replayed: pkg.ReplaySummary) -> dict[str, Path]:
    folder = root / "plots"
    folder.mkdir(exist_ok=True)
    specs = {
        "Spend by team (currency units)": (
            "SELECT team, sum(charged_micros) / 1e6 FROM events WHERE type = 'BudgetSettled' GROUP BY 1 ORDER BY 1",
            "spend_by_team.png"),
        "Decisions by outcome": (
            "SELECT CASE WHEN type = 'RequestDenied' THEN 'denied: ' || coalesce(rule, reason) ELSE type END, count(*)"
            " FROM events WHERE type IN ('RequestAuthorized', 'RequestDenied', 'BudgetRejected', 'RouteUnavailable')"
            " GROUP BY 1 ORDER BY 2 DESC",
            "decisions_by_outcome.png"),
        "Median latency by model (ms)": (
            "SELECT model_id, median(latency_ms) FROM events WHERE type = 'InvocationCompleted' GROUP BY 1 ORDER BY 1",
            "latency_by_model.png"),
    }
    out: dict[str, Path] = {}
    for title, (sql, name) in specs.items():
        rows = _query(root, sql, period)
        out[title] = _bar(folder / name, title if rows else f"{title}: none in this period",
                          [(str(r[0]), float(str(r[1]))) for r in rows])
    title = "Replay of every recorded decision (whole stream)"
    out[title] = _bar(folder / "replay_result.png", title, [
        ("reproduced", float(replayed.reproduced)),
        ("not reproduced", float(replayed.decisions - replayed.reproduced)),
        ("observations (not re-decided)", float(replayed.observations)),
    ], colours=["#2f855a", "#c53030", "#718096"])
    return out


def _bar(path: Path, title: str, bars: list[tuple[str, float]], colours: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display in an enclave server room
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = ax.barh([b[0] for b in bars], [b[1] for b in bars], color=colours or "#2b6cb0")
    ax.bar_label(drawn, labels=[f"{b[1]:,.6g}" for b in bars], fontsize=8)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(counts: dict[str, object], figures: dict[str, Path]) -> str:
    lines = [
        "# Enclave Gateway: validation document",
        "",
        f"Events {counts['first']}..{counts['last']} ({counts['events']} audit rows, {counts['denials']} denials, "
        f"{counts['checkpoints']} signed checkpoints). Check the package with `gateway evidence verify DIR`; every "
        "figure below is computed from `audit/events` in this package.",
        "",
        "## Replay",
        "",
        f"{counts['replay']}.",
        "",
        "## Controls (NIST SP 800-53 rev5)",
        "",
        "| control | asks | evidenced by |",
        "|---|---|---|",
        *(f"| {c} | {what} | {where} |" for c, what, where in CONTROLS),
        "",
        "## Figures",
        "",
        *(f"![{title}](plots/{path.name})\n" for title, path in figures.items()),
    ]
    return "\n".join(lines) + "\n"


def _html(counts: dict[str, object], figures: dict[str, Path]) -> str:
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(w)}</td><td>{html.escape(e)}</td></tr>"
                   for c, w, e in CONTROLS)
    imgs = "".join(f'<figure><img src="plots/{p.name}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
                   "</figcaption></figure>" for t, p in figures.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Enclave Gateway: validation document</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:4px 8px;vertical-align:top}img{max-width:100%}</style></head><body>"
        "<h1>Enclave Gateway: validation document</h1>"
        f"<p>Events {counts['first']}..{counts['last']} ({counts['events']} audit rows, {counts['denials']} denials, "
        f"{counts['checkpoints']} signed checkpoints). Check the package with <code>gateway evidence verify DIR"
        f"</code>.</p><h2>Replay</h2><p>{html.escape(str(counts['replay']))}.</p>"
        "<h2>Controls (NIST SP 800-53 rev5)</h2>"
        f"<table><tr><th>control</th><th>asks</th><th>evidenced by</th></tr>{rows}</table>"
        f"<h2>Figures</h2>{imgs}</body></html>\n"
    )
