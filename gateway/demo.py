"""`gateway demo`: two teams through the whole pipeline, then the audit queried with SQL."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import audit_sql, config, issuer, nats_auth, runtime
from .engine import Engine
from .runtime import Gateway
from .schemas import codec, subjects
from .schemas.commands import ChatBody, ChatMessage, SubmitRequest
from .services import bus, egress
from .services.policy import FILES
from .services.settings import WorkerSettings
from .violations import list_violations, violations_table

console = Console()
# the shipped bundle: the repository's policies/ in a checkout, the wheel's copy when installed
POLICIES = Path(str(importlib.resources.files("enclave_gateway") / "policies"))
SAMPLE_SQL = """SELECT coalesce(team, '(no valid session)') AS team,
       count(*) FILTER (WHERE type = 'InvocationCompleted') AS completed,
       count(*) FILTER (WHERE type = 'RequestDenied') AS denied,
       count(*) FILTER (WHERE type = 'BudgetRejected') AS over_budget,
       count(*) FILTER (WHERE type = 'InvocationFailed') AS failed_attempts,
       coalesce(sum(charged_micros), 0) AS spent_micros
FROM events
WHERE type IN ('InvocationCompleted', 'RequestDenied', 'BudgetRejected', 'InvocationFailed', 'BudgetSettled')
GROUP BY 1 ORDER BY 1"""


FALLBACK_SQL = """SELECT f.request_id, f.endpoint, f.reason,
       (SELECT r.endpoint FROM events r WHERE r.type = 'RouteSelected' AND r.request_id = f.request_id
          AND r.seq > f.seq ORDER BY r.seq LIMIT 1),
       (SELECT o.outcome FROM events o WHERE o.type = 'ResponseDelivered' AND o.request_id = f.request_id LIMIT 1)
FROM events f WHERE f.type = 'InvocationFailed' ORDER BY f.seq"""


# The demo's burst client: a third request within a minute is refused. A limit of the demo's own,
# added to its copy of the bundle: the shipped bundle sets none (limits are each deployment's).
DEMO_RATE_LIMIT = '\n[application."rate-demo"]\nrequests_per_minute = 2\n'


def _policy_dir(data_dir: Path) -> Path:
    """The repository's bundle when run from a checkout, else the bundle beside the package, copied
    into the data dir with the demo's rate limit added."""
    local = Path.cwd() / "policies"
    shipped = local if (local / "catalog.toml").exists() else POLICIES
    folder = data_dir / "demo-policies"
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (shipped / name).is_file():
            (folder / name).write_text((shipped / name).read_text())
    with open(folder / "admission.toml", "a") as fh:
        fh.write(DEMO_RATE_LIMIT)
    return folder


def http_chat(
    base: str, token: str, model: str, text: str, labels: tuple[str, str] | None = None, max_tokens: int = 16,
    timeout_s: float | None = None,
) -> tuple[int, dict[str, object]]:
    """One OpenAI-style HTTP call, with input/output classification headers if given."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
            **({"X-Input-Classification": labels[0], "X-Output-Classification": labels[1]} if labels else {}),
            **({"X-Request-Timeout": str(timeout_s)} if timeout_s else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def http_stream(base: str, token: str, model: str, text: str, max_tokens: int = 48) -> Iterator[dict[str, Any]]:
    """One `stream: true` call: each server-sent chunk as the edge sends it."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def _show_stream(base: str, token: str) -> None:
    """A streamed answer, printed token by token as it arrives."""
    console.print("\n[bold]Streaming[/] (stream: true): alice's answer, token by token as the model produces it")
    t0, first, pieces, usage = time.perf_counter(), None, 0, None
    for chunk in http_stream(base, token, "enclave-tiny", "Stream the situation report."):
        delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
        if delta:
            first = first if first is not None else (time.perf_counter() - t0) * 1000
            pieces += 1
            console.print(delta, end="", style="green", highlight=False, soft_wrap=True)
        usage = chunk.get("usage") or usage
    console.print()
    if usage is not None and first is not None:
        console.print(f"{pieces} chunks, first after {first:.0f} ms; usage chunk: {usage['prompt_tokens']} prompt + "
                      f"{usage['completion_tokens']} completion tokens (the server reported none: counted by the "
                      "gateway, recorded in InvocationCompleted and settled on)")


DEMO_APP = "batch"  # the demo's batch system, with an application identity of its own
UNHOSTED = "analyst-large"  # catalogued, but no invoker of the demo hosts its endpoint


async def nats_chat(settings: WorkerSettings, token: str, model: str, text: str) -> dict[str, object]:
    """One request on `gw.submit.batch` as the application `batch`; returns the reply as a dict."""
    nc = await bus.connect(settings, f"app.{DEMO_APP}")
    try:
        cmd = SubmitRequest(
            token=token,
            chat=ChatBody(
                model=model, messages=(ChatMessage(role="user", content=text),), max_tokens=16, temperature=0.0
            ),
        )
        msg = await nc.request(subjects.submit(DEMO_APP), codec.encode(cmd), timeout=60)
        reply: dict[str, object] = json.loads(msg.data)
        return reply
    finally:
        await nc.close()


async def wait_audited(settings: WorkerSettings) -> None:
    """Until the auditor has acked everything in the stream."""
    nc = await bus.connect(settings, "admin")
    try:
        await runtime.wait_audited(nc)
    finally:
        await nc.close()


def _outcome(body: dict[str, object]) -> str:
    """One short line: the completion with its usage, or the error code, rule and figures."""
    err = body.get("error")
    if isinstance(err, dict):
        rule = f" (rule {err['rule']})" if err.get("rule") else ""
        figures = ""
        if err.get("remaining_micros") is not None:
            figures = f" requested {err['requested_micros']}µ, remaining {err['remaining_micros']}µ"
        if err.get("retry_after_s") is not None:
            figures += f" Retry-After: {err['retry_after_s']} s"
        if err.get("rule") == "content-marking":  # the marking and where it stands, never the text around it
            figures += f": {err.get('message')}"
        return f"[red]{err.get('code')}[/]{rule}{figures}"
    choices, usage = body.get("choices"), body.get("usage")
    if isinstance(choices, list) and isinstance(usage, dict):  # OpenAI chat.completion (HTTP)
        text, model, tokens = choices[0]["message"]["content"], body.get("model"), usage["completion_tokens"]
    else:  # SubmitReply (NATS)
        comp = body.get("completion")
        assert isinstance(comp, dict)
        text, model, tokens = comp["content"], comp["model"], comp["usage"]["completion_tokens"]
    return f"[green]completed[/] by {model}: {str(text)[:16]!r}… ({tokens} tokens)"


def _summarize(rows: list[tuple[str, str, str, int, dict[str, object]]]) -> Table:
    t = Table(title="Requests through the gateway")
    for col in ("caller", "entry", "asked for", "HTTP", "outcome"):
        t.add_column(col, overflow="fold")
    for who, entry, model, status, body in rows:
        t.add_row(who, entry, model, str(status) if entry == "HTTP" else "-", _outcome(body))
    return t


Step = tuple[str, str, str, str, tuple[str, str] | None]  # who, token, model, prompt, (input, output) labels


def _plan(keys: Path) -> tuple[list[Step], str]:
    """The scripted HTTP requests, and alice's token for the batch job over NATS."""
    alice = issuer.issue(keys, subject="alice", team="alpha", roles=("analyst",))
    carol = issuer.issue(
        keys, subject="carol", team="alpha", clearance="SECRET", compartments=("SI",), caveats=("NOFORN",)
    )
    bob = issuer.issue(keys, subject="bob", team="bravo")
    burst = issuer.issue(keys, subject="rate-demo", team="alpha")
    expired = issuer.issue(keys, subject="eve", team="alpha", ttl_s=60, now=int(time.time()) - 3600)
    forged = issuer.issue(Path(tempfile.mkdtemp()) / "k", subject="mallory", team="alpha")
    plan: list[Step] = [
        ("carol@alpha S//SI", carol, "enclave-tiny", "Summarise the intercept.", ("SECRET//SI", "SECRET//SI")),
        ("carol@alpha S//SI", carol, "enclave-tiny", "Post it to the open wiki.", ("SECRET//SI", "UNCLASSIFIED")),
        # declared UNCLASSIFIED, but the pasted paragraph says what it is: the guard raises the label
        ("carol@alpha declares U", carol, "enclave-tiny", "Tidy this up:\n(S//NF) The convoy leaves at dawn.",
         ("UNCLASSIFIED", "UNCLASSIFIED")),
        ("alice@alpha", alice, "enclave-tiny", "Summarise the logistics report.", None),
        ("alice@alpha", alice, "tiny", "Alias: same model by its short name.", None),
        ("alice@alpha", alice, "enclave-tiny-v0", "A renamed model, swapped by the catalog.", None),
        ("alice@alpha", alice, UNHOSTED, "No invoker hosts this model here: ends at its deadline.", None),
        ("bob@bravo", bob, "analyst-large", "Not allowed for team bravo.", None),
        ("mallory (forged)", forged, "enclave-tiny", "Forged token.", None),
        ("eve (expired)", expired, "enclave-tiny", "Expired token.", None),
        ("nobody", "", "enclave-tiny", "No token at all.", None),
        ("alice@alpha", alice, "gpt-9", "Unknown model.", None),
    ] + [("bob@bravo", bob, "enclave-tiny", f"Bravo request {i}: until the cap.", None) for i in range(6)] + [
        # admission.toml allows the application rate-demo 2 requests a minute: a third is refused
        # (five, so that one is refused even when the burst straddles a minute's end)
        ("rate-demo@alpha", burst, "enclave-tiny", f"Burst request {i}.", None) for i in range(5)]
    return plan, alice


def _show_audit(audit: Path) -> None:
    """Spend by team, the violations feed and the budget alerts, all from the Parquet audit."""
    console.print(f"\nParquet audit: [bold]{audit}/events/day=*/*.parquet[/]")
    console.print("Where did the AI budget go? (DuckDB over the Parquet audit)")
    console.print(f"[cyan]{SAMPLE_SQL}[/]")
    cols, result = audit_sql.query(audit, SAMPLE_SQL)
    t = Table()
    for c in cols:
        t.add_column(c)
    for r in result:
        t.add_row(*("" if v is None else str(v) for v in r))
    console.print(t)
    console.print("\n[bold]gateway violations[/] (the feed an assessor queries; live on gw.evt.request.denied.>)")
    console.print(violations_table(list_violations(audit)[1]))
    _, alerts = audit_sql.query(
        audit, "SELECT team, period, amount_micros FROM events WHERE type = 'BudgetThresholdCrossed' ORDER BY seq"
    )
    for team, period, pct in alerts:
        console.print(f"budget alert: team [bold]{team}[/] committed {pct}% of its {period} cap")
    console.print("Spend report: gateway report spend --by team --plot spend.png (reconciles with the ledger)")


def _show_fallbacks(audit: Path) -> None:
    """Every failed attempt and where the router sent the request next, from the Parquet audit."""
    _, rows = audit_sql.query(audit, FALLBACK_SQL)
    t = Table(title="Fallbacks: a failed attempt is routed on to the model's next endpoint (replayable)")
    for col in ("request", "failed at", "error", "then routed to", "outcome"):
        t.add_column(col)
    for rid, failed_at, error, next_endpoint, outcome in rows:
        t.add_row(str(rid)[:8], str(failed_at), str(error), str(next_endpoint or "-"), str(outcome or "-"))
    console.print(t)


def run_demo(data_dir: Path | None, enclave: bool = False) -> int:
    """Start everything on free ports, send the scripted requests, show the audit."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gateway-demo-")
        data_dir = Path(tmp.name)
    nats_auth.ensure_creds(data_dir / "creds", (DEMO_APP,))  # what `gateway app add batch` does
    second = Engine(data_dir, name="llama-server-2")  # enclave-tiny's second endpoint, for the fallback
    with console.status("starting nats-server, two llama.cpp servers and six workers..."):
        try:
            # a checkpoint every few seconds: the demo is short, and an assessor looks for one (console, evidence)
            gw = Gateway(data_dir, _policy_dir(data_dir), nats_port=-1, http_port=0,
                         audit=config.AuditConfig(checkpoint_events=1000, checkpoint_seconds=3.0),
                         endpoints={"local-llama-2": second.start()}, serve_tiny="local-llama",
                         egress_allow=egress.LOOPBACK if enclave else None)
            gw.__enter__()
        except BaseException:
            second.stop()
            raise
    try:
        console.print(f"gateway up: HTTP {gw.http_url}  NATS {gw.nats_url}"
                      + ("  (enclave mode: model servers on loopback only)" if enclave else ""))
        plan, alice = _plan(data_dir / "keys")
        rows: list[tuple[str, str, str, int, dict[str, object]]] = []
        with console.status("sending requests..."):
            for who, token, model, text, labels in plan:
                # no invoker hosts analyst-large's endpoint here: its route waits, so ask it to wait little
                status, body = http_chat(gw.http_url, token, model, text, labels,
                                         timeout_s=2.0 if model == UNHOSTED else None)
                rows.append((who, "HTTP", model, status, body))
            reply = asyncio.run(nats_chat(gw.settings, alice, "enclave-tiny", "Batch job over gw.submit."))
            rows.append(("alice@alpha", "NATS", "enclave-tiny", 200 if reply.get("completion") else 0, reply))
            assert gw.engine is not None
            gw.engine.stop()  # local-llama goes down: enclave-tiny's next endpoint takes over
            for text in ("After local-llama stopped: served by local-llama-2.", "And again."):
                status, body = http_chat(gw.http_url, alice, "enclave-tiny", text)
                rows.append(("alice@alpha (local-llama down)", "HTTP", "enclave-tiny", status, body))
        console.print(_summarize(rows))
        _show_stream(gw.http_url, alice)
        with console.status("waiting for the auditor..."):
            asyncio.run(wait_audited(gw.settings))
        _show_fallbacks(data_dir / "audit")
        _show_audit(data_dir / "audit")
        console.print(
            f'Try: gateway sql "SELECT type, count(*) FROM events GROUP BY type" --data-dir {data_dir}'
            if tmp is None
            else "Run `gateway demo --data-dir DIR` to keep the data and query it later."
        )
    finally:
        second.stop()
        with console.status("stopping..."):
            gw.stop()
        if tmp is not None:
            tmp.cleanup()
    return 0
