"""`gateway`: run, inspect and query an Enclave Gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import audit_sql, issuer, supervision
from .services import registry
from .services.settings import WorkerSettings

console = Console()


def _table(cols: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> Table:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one service until SIGTERM/SIGINT."""
    from .services import logs
    from .services import loop as event_loop
    from .supervisor import SERVICES

    logs.configure(args.name)  # JSON lines carrying request_id (services/logs.py)
    settings = msgspec.json.decode(Path(args.settings).read_bytes(), type=WorkerSettings)

    async def main() -> None:
        logging.getLogger("enclave_gateway.worker").info("%s runs on the %s event loop", args.name, event_loop.name())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(logs.loop_exception)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        beating = asyncio.create_task(supervision.beat(args.beat_fd)) if args.beat_fd is not None else None
        try:
            await SERVICES[args.name](settings, stop)
        finally:
            if beating is not None:
                beating.cancel()
        if not stop.is_set():  # a worker that stopped working must not look alive to the supervisor
            logging.getLogger("enclave_gateway.worker").error("%s ended before it was told to stop", args.name)
            raise SystemExit(1)

    event_loop.run(main())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Broker, engine and every worker on this machine until Ctrl-C."""
    from .deployment import preflight
    from .runtime import Gateway

    preflight(Path(args.config))  # a missing or invalid file, bad bundle, taken port: one line from main()
    gw = Gateway.from_config(Path(args.config), nats_port=None, http_port=None)
    gw.say = lambda line: console.print(f"[yellow]{escape(line)}[/]")  # restarts, as they happen
    try:
        gw.__enter__()  # returns once /readyz says every stage consumes; stops what it started if not
    except KeyboardInterrupt:
        console.print("interrupted while starting: stopped")
        return 130
    try:
        for notice in gw.notices:
            console.print(f"[yellow]{escape(notice)}[/]")
        console.print(f"[bold green]Enclave Gateway up[/]: HTTP {gw.http_url}  NATS {gw.nats_url}  data {gw.data_dir}")
        console.print("Ctrl-C to stop.")
        gw.wait_for_signal()
    finally:
        gw.stop()
    console.print("stopped cleanly")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Make the bus's CA and the brokers' certificate (tests and demos; an enclave brings its PKI)."""
    from .tls import make

    hosts = tuple(args.host or ("localhost", "127.0.0.1", "::1"))
    certs = make(Path(args.dir), hosts)
    console.print(f"CA {certs.ca_file}; broker certificate {certs.cert_file} for {', '.join(hosts)}; "
                  f"key {certs.key_file} (0600)", soft_wrap=True)
    return 0


def cmd_cluster_layout(args: argparse.Namespace) -> int:
    """Write what compose.yaml mounts: node configs, NKey users, TLS, worker settings."""
    from .cluster_layout import write

    endpoints = dict(e.split("=", 1) for e in args.endpoint)
    written = write(Path(args.dir), Path(args.policy_dir), endpoints, [Path(p) for p in args.signer], args.nodes)
    console.print(f"wrote {len(written)} files into {args.dir} (seeds and the broker key 0600: keep it off git)")
    if not args.signer:
        console.print(f"[yellow]DEV policy signer in {Path(args.dir) / 'keys'}: pass --signer FILE.pub.json "
                      "to pin your own before an assessment[/]")
    return 0


def cmd_contracts(args: argparse.Namespace) -> int:
    """Write the OpenAPI document of the edge and the AsyncAPI document of the bus."""
    from .contracts import write

    for path in write(Path(args.write)):
        console.print(f"wrote {path}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Lay out a deployment (configuration, policy bundle, README) from the installed package."""
    from .deployment import init

    folder = Path(args.dir)
    written = init(folder, http_port=args.http_port, nats_port=args.nats_port, force=args.force)
    console.print(f"laid out {folder}: {', '.join(str(p.relative_to(folder)) for p in written)}", soft_wrap=True)
    console.print(f"start it: gateway up --config {folder / 'gateway.toml'}  (README.md there says more)",
                  soft_wrap=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The walking skeleton end to end, on free ports, in a fresh data dir."""
    from .demo import run_demo

    return run_demo(Path(args.data_dir) if args.data_dir else None, enclave=args.enclave)


def cmd_token_issue(args: argparse.Namespace) -> int:
    """Print a signed dev session token."""
    print(
        issuer.issue(
            Path(args.data_dir) / "keys",
            subject=args.sub,
            team=args.team,
            roles=tuple(args.role),
            ttl_s=args.ttl,
            clearance=args.clearance,
            compartments=tuple(args.compartment),
            caveats=tuple(args.caveat),
        )
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Stream and consumer state of the running gateway."""
    from .runtime import status_rows

    try:
        cols, rows = asyncio.run(status_rows(Path(args.data_dir)))
    except FileNotFoundError:
        console.print(f"[red]no gateway has run from {args.data_dir}[/] (start one with `gateway up`)")
        return 1
    except Exception as exc:  # the broker is down: say so instead of a traceback
        console.print(f"[red]gateway at {args.data_dir} is not reachable:[/] {exc!r}")
        return 1
    console.print(_table(cols, rows, title="GW_EVENTS consumers"))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """Run SQL over the Parquet audit (view `events`)."""
    cols, rows = audit_sql.query(Path(args.data_dir) / "audit", args.query)
    console.print(_table(cols, rows))
    return 0


def cmd_bus_setup(args: argparse.Namespace) -> int:
    """Create or update the stream and consumers on an existing (clustered) NATS."""
    from .runtime import setup_topology

    if args.settings:  # a deployment's worker settings: its URLs, NKeys and pinned CA
        settings = msgspec.json.decode(Path(args.settings).read_bytes(), type=WorkerSettings)
    elif args.url:
        settings = WorkerSettings(nats_url=args.url, data_dir=args.data_dir, policy_dir=args.policy_dir,
                                  creds_dir=str(Path(args.data_dir) / "creds"))
    else:
        console.print("[red]bus-setup needs --settings FILE or --url URL[/]")
        return 2
    asyncio.run(setup_topology(settings, args.replicas, tuple(args.endpoint)))
    console.print(f"GW_EVENTS ready on {settings.nats_url} with {args.replicas} replica(s)")
    return 0


def cmd_policy_keygen(args: argparse.Namespace) -> int:
    """Make a policy-signing key pair."""
    from .policy_admin import keygen

    try:
        public = keygen(Path(args.out))
    except FileExistsError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    console.print(f"signing key {args.out}.key (0600); public key {args.out}.pub.json, key id {public.kid}")
    console.print("pin the public key in gateway.toml: [policy] trusted_signers = [\"...pub.json\"]")
    return 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    """Validate a bundle and sign it (writes bundle.sig beside its files)."""
    from .policy_admin import sign_folder
    from .services.policy import PolicyError

    try:
        sig = sign_folder(Path(args.dir), Path(args.key))
    except PolicyError as exc:
        console.print(f"[red]not signed:[/] {exc}")
        return 1
    console.print(f"signed {args.dir} (sha256 {sig.sha256[:16]}…) by {sig.kid}")
    return 0


def cmd_policy_activate(args: argparse.Namespace) -> int:
    """Validate a signed bundle and make it the active policy of the running gateway."""
    from .runtime import activate
    from .services.policy import PolicyError
    from .supervisor import read_settings

    try:
        settings = read_settings(Path(args.data_dir))
        event = asyncio.run(activate(settings, Path(args.dir), args.by))
    except PolicyError as exc:
        console.print(f"[red]policy refused, the active one stays:[/] {exc}")
        return 1
    except FileNotFoundError as exc:
        console.print(f"[red]no running gateway at {args.data_dir}:[/] {exc}")
        return 1
    console.print(f"activated {event.version} (sha256 {event.sha256[:16]}…, signer {event.signer}, "
                  f"git {event.git_commit or '-'})")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Add, remove or list application identities; the running broker reloads at once."""
    from . import nats_auth

    data_dir = Path(args.data_dir)
    creds = data_dir / "creds"
    try:
        if args.app_cmd == "add":
            seed = nats_auth.add_app(creds, args.name)
        elif args.app_cmd == "remove":
            nats_auth.remove_app(creds, args.name)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    if args.app_cmd != "list":
        nats_auth.write_authorization(creds, data_dir)
        live = nats_auth.reload_broker(data_dir / "nats.pid")
        state = "the running broker reloaded" if live else "no broker running; it applies at the next `gateway up`"
        if args.app_cmd == "add":
            console.print(f"application {args.name!r}: NKey seed {seed} (0600, hand it to the application only)")
            console.print(f"  submit on gw.submit.{args.name}, inbox prefix _INBOX_app.{args.name}; {state}")
        else:
            console.print(f"application {args.name!r} revoked; {state}")
        return 0
    rows = [(a, f"gw.submit.{a}", f"_INBOX_app.{a}") for a in nats_auth.apps(creds)]
    console.print(_table(["application", "submits on", "inbox prefix"], rows, title="Application identities"))
    return 0


def cmd_violations(args: argparse.Namespace) -> int:
    """List denials from the violations table, or follow them live."""
    from .violations import follow, list_violations, violations_table

    if args.follow:
        return follow(Path(args.data_dir))
    cols, rows = list_violations(Path(args.data_dir) / "audit", since=args.since, rule=args.rule, team=args.team)
    if args.json:
        for row in rows:
            print(json.dumps(dict(zip(cols, row, strict=True)), default=str))
        return 0
    console.print(violations_table(rows))
    return 0


def cmd_report_spend(args: argparse.Namespace) -> int:
    """Spend by team, model or day, reconciled with the budget ledger, optionally plotted."""
    from .reports import caps, plot, reconcile, spend

    data_dir = Path(args.data_dir)
    cols, rows = spend(data_dir / "audit", args.by, args.since)
    console.print(_table(cols, rows, title=f"Spend by {args.by} (micro-units; 1,000,000 = 1 currency unit)"))
    if args.plot:
        team_caps = caps(data_dir / "audit") if args.by == "team" else None
        console.print(f"plot: {plot(cols, rows, args.by, Path(args.plot), team_caps)}")
    source, mismatches = reconcile(data_dir)
    if mismatches:
        console.print(
            _table(
                ["team", "period", "audited", "budget state"],
                mismatches,
                title=f"[red]NOT reconciled with the {source}[/]",
            )
        )
        return 1
    console.print(f"[green]reconciled[/]: audited spend equals the {source} for every team and period")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the read-only web console over a data dir (a running gateway's, or a stopped one's)."""
    from . import config
    from .console import app as console_app
    from .runtime import reachable_settings

    cfg = config.load(Path(args.config)).console
    data_dir = Path(args.data_dir or config.load(Path(args.config)).data_dir)
    from .supervisor import settings_path

    if not settings_path(data_dir).exists():
        console.print(f"[red]no gateway data in {data_dir}[/] (run `gateway up` or `gateway demo --data-dir D` first)")
        return 1
    host, port = args.host or cfg.host, cfg.port if args.port is None else args.port
    with reachable_settings(data_dir, audited=True) as settings:
        async def serve() -> None:
            async with console_app.serving(settings, host, port, cfg.roles) as url:
                if args.screenshots:
                    from .console import screenshots

                    token = issuer.issue(data_dir / "keys", subject="console-screenshots", team="console",
                                         roles=("assessor",), ttl_s=600)
                    shots = await asyncio.to_thread(screenshots.take, url, token, Path(args.screenshots),
                                                    args.request)
                    console.print(f"wrote {len(shots)} screenshots to {args.screenshots}")
                    return
                console.print(f"console on {url} (bus {settings.nats_url}); roles {', '.join(cfg.roles)}; "
                              "Ctrl-C to stop", highlight=False)
                stop = asyncio.Event()  # SIGTERM as Ctrl-C: the broker and auditor it started are stopped
                for sig in (signal.SIGTERM, signal.SIGINT):
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                await stop.wait()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve())
    return 0


def cmd_report_request(args: argparse.Namespace) -> int:
    """One request's timeline from the Parquet audit."""
    from .reports import timeline

    cols, rows = timeline(Path(args.data_dir) / "audit", args.request_id)
    if not rows:
        console.print(f"[red]no audited event of request {args.request_id!r}[/]")
        return 1
    console.print(_table(cols, rows, title=f"Request {args.request_id}"))
    return 0


def cmd_report_refusals(args: argparse.Namespace) -> int:
    """Refusals by team, code and rule: denials, spend caps and rate limits."""
    from .reports import refusals

    cols, rows = refusals(Path(args.data_dir) / "audit", args.since)
    console.print(_table(cols, rows, title="Refusals by team, code and the rule or limit that refused"))
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    """Print the registry of identities: who may publish and subscribe what (docs/security.md)."""
    print(registry.markdown_table(), end="")
    return 0


def cmd_evidence_export(args: argparse.Namespace) -> int:
    """Write the evidence package of the running gateway."""
    from .evidence import export
    from .runtime import reachable_settings

    try:
        with reachable_settings(Path(args.data_dir), audited=True) as settings:
            manifest = asyncio.run(export(settings, Path(args.dir), args.period))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    head = manifest.chain_head.head[:16]
    console.print(f"evidence package {args.dir}: {manifest.events} events (seq {manifest.first_seq}.."
                  f"{manifest.last_seq}), {len(manifest.files)} files, signed chain head {head}…")
    return 0


def cmd_evidence_verify(args: argparse.Namespace) -> int:
    """Check an evidence package offline; exit 1 naming every failure."""
    from .replay.verify import verify
    from .services import keys

    anchor = keys.load_public(Path(args.audit_key)) if args.audit_key else None
    report = verify(Path(args.dir), anchor)
    if args.oscal:
        from . import oscal

        summary = (f"{report.files} files, {report.events} events (seq {report.first_seq}..{report.last_seq}), "
                   f"{report.checkpoints} signed checkpoints, audit key sha256:{report.fingerprint}, "
                   f"{'anchored' if report.anchored else 'unanchored'}; {len(report.findings)} failure(s)")
        results = oscal.assessment_results([(f.where, f.problem) for f in report.findings], summary, args.dir,
                                           oscal.now_utc())
        console.print(f"OSCAL assessment results: {oscal.write_validated(results, Path(args.oscal))}")
    console.print(f"audit signer {report.signer}, key fingerprint sha256:{report.fingerprint}; events seq "
                  f"{report.first_seq}..{report.last_seq}")
    if report.notices:
        console.print(_table(["where", "notice"], [(f.where, f.problem) for f in report.notices],
                             title="notices (not failures)"))
    if report.ok:
        anchored = "anchored to the trusted audit key" if report.anchored else "[yellow]UNANCHORED[/] (--audit-key)"
        console.print(f"[green]verified[/]: {report.files} files, {report.events} events, {report.checkpoints} signed "
                      f"checkpoints; {anchored}")
        return 0
    console.print(_table(["where", "problem"], [(f.where, f.problem) for f in report.findings],
                         title=f"[red]evidence NOT verified: {len(report.findings)} failure(s)[/]"))
    return 1


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run every recorded decision with its recorded policy; exit 1 on any mismatch."""
    from . import replay_cli

    if args.source == "parquet" and not args.package:
        console.print("[red]--source parquet replays a Parquet snapshot of the stream: name it with --package DIR[/] "
                      "(the stream.parquet of an evidence package; the audit tables do not hold the inputs)")
        return 2
    if args.source == "stream" and args.package:
        console.print("[red]--package replays the package's Parquet stream, not the live one: drop --source stream[/]")
        return 2
    if args.package:
        stored, jwks, trusted = replay_cli.from_package(Path(args.package))
    else:
        try:
            stored, jwks, trusted = replay_cli.from_stream(Path(args.data_dir))
        except (FileNotFoundError, OSError) as exc:
            console.print(f"[red]no running gateway at {args.data_dir}:[/] {exc!r} (or replay an evidence package: "
                          "--package DIR)")
            return 1
    return replay_cli.run(console, stored, jwks, trusted, args.from_seq, args.to_seq, args.show,
                          None if args.package else Path(args.data_dir))


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start broker, engine and all workers")
    up.add_argument("--config", default="gateway.toml")
    up.set_defaults(func=cmd_up)
    ini = sub.add_parser("init", help="lay out a deployment in DIR: gateway.toml, policies/, README.md")
    ini.add_argument("dir")
    ini.add_argument("--http-port", type=int, default=8080)
    ini.add_argument("--nats-port", type=int, default=4222)
    ini.add_argument("--force", action="store_true",
                     help="rewrite gateway.toml, README.md and policies/ in a non-empty DIR (var/ is kept)")
    ini.set_defaults(func=cmd_init)
    demo = sub.add_parser("demo", help="run the end-to-end demo on free ports")
    demo.add_argument("--data-dir", help="keep the demo's data here (default: a temporary folder)")
    demo.add_argument("--enclave", action="store_true", help="enclave mode: model servers on loopback only")
    demo.set_defaults(func=cmd_demo)
    w = sub.add_parser("worker", help="run one service (used by `gateway up`)")
    w.add_argument("name", choices=[i.name for i in registry.SERVICES])
    w.add_argument("--settings", required=True)
    w.add_argument("--beat-fd", type=int, help="a pipe to write a byte into every second while the event loop "
                                               "runs (the supervisor's sign of life)")
    w.set_defaults(func=cmd_worker)
    tok = sub.add_parser("token", help="session tokens").add_subparsers(dest="token_cmd", required=True)
    ti = tok.add_parser("issue", help="issue a dev token signed by the data dir's key")
    ti.add_argument("--sub", required=True)
    ti.add_argument("--team", required=True)
    ti.add_argument("--role", action="append", default=[])
    ti.add_argument("--ttl", type=int, default=3600)
    ti.add_argument("--clearance", default="UNCLASSIFIED", help="UNCLASSIFIED, CUI, CONFIDENTIAL, SECRET, TOP SECRET")
    ti.add_argument("--compartment", action="append", default=[])
    ti.add_argument("--caveat", action="append", default=[], help="e.g. NOFORN")
    ti.add_argument("--data-dir", default="var")
    ti.set_defaults(func=cmd_token_issue)
    bs = sub.add_parser("bus-setup", help="create the stream and consumers on a running NATS (clusters)")
    bs.add_argument("--url", help="the bus (or give --settings)")
    bs.add_argument("--settings", help="a worker settings file (gateway cluster-layout): URLs, NKeys, CA")
    bs.add_argument("--replicas", type=int, default=1)
    bs.add_argument("--data-dir", default="var", help="where creds/admin.creds.json is, if the bus has users")
    bs.add_argument("--policy-dir", default="", help="a bundle whose catalog's endpoints get their invokers' durables")
    bs.add_argument("--endpoint", action="append", default=[], help="an endpoint whose invokers' durable to make")
    bs.set_defaults(func=cmd_bus_setup)
    pol = sub.add_parser("policy", help="policy bundles").add_subparsers(dest="policy_cmd", required=True)
    pk = pol.add_parser("keygen", help="make a policy-signing key pair (Ed25519)")
    pk.add_argument("--out", required=True, help="file stem: writes STEM.key (0600) and STEM.pub.json")
    pk.set_defaults(func=cmd_policy_keygen)
    ps = pol.add_parser("sign", help="validate a bundle and sign it (writes DIR/bundle.sig)")
    ps.add_argument("--key", required=True, help="the signing key (PEM) from `gateway policy keygen`")
    ps.add_argument("--dir", default="policies")
    ps.set_defaults(func=cmd_policy_sign)
    pa = pol.add_parser("activate", help="make a signed bundle active on every worker")
    pa.add_argument("--dir", default="policies")
    pa.add_argument("--data-dir", default="var")
    pa.add_argument("--by", default="operator", help="who activates it (recorded in the event)")
    pa.set_defaults(func=cmd_policy_activate)
    ap = sub.add_parser("app", help="application identities").add_subparsers(dest="app_cmd", required=True)
    for verb, text in (("add", "create an application identity"), ("remove", "revoke one on the running server")):
        a = ap.add_parser(verb, help=text)
        a.add_argument("name")
        a.add_argument("--data-dir", default="var")
        a.set_defaults(func=cmd_app)
    al = ap.add_parser("list", help="list application identities")
    al.add_argument("--data-dir", default="var")
    al.set_defaults(func=cmd_app)
    rp = sub.add_parser("replay", help="re-run every recorded decision with the policy it was made under")
    rp.add_argument("--from", dest="from_seq", type=int, default=0, help="first stream sequence to check")
    rp.add_argument("--to", dest="to_seq", type=int, default=None, help="last stream sequence to check")
    rp.add_argument("--source", choices=("stream", "parquet"), default=None,
                    help="stream: the gateway's JetStream stream (default); parquet: the Parquet snapshot of the "
                         "stream in an evidence package (--package)")
    rp.add_argument("--package", help="the evidence package whose stream.parquet to replay (implies --source parquet)")
    rp.add_argument("--show", type=int, default=5, help="how many mismatches to show in full")
    rp.add_argument("--data-dir", default="var")
    rp.set_defaults(func=cmd_replay)
    ev = sub.add_parser("evidence", help="evidence packages for assessors").add_subparsers(dest="ev_cmd", required=True)
    ee = ev.add_parser("export", help="write the signed evidence package of the running gateway into DIR")
    ee.add_argument("dir")
    ee.add_argument("--period", help="YYYY, YYYY-MM or YYYY-MM-DD: tables, violations and the document cover only "
                                     "those days (the stream and its chain are always whole)")
    ee.add_argument("--data-dir", default="var")
    ee.set_defaults(func=cmd_evidence_export)
    evv = ev.add_parser("verify", help="check an evidence package offline, naming every failure")
    evv.add_argument("dir")
    evv.add_argument("--oscal", help="also write the result as OSCAL assessment results (JSON) here")
    evv.add_argument("--audit-key", help="the deployment's audit-signer.pub.json, from out of band: the trust anchor")
    evv.set_defaults(func=cmd_evidence_verify)
    ids = sub.add_parser("identities", help="the registry of NATS identities and their permissions (Markdown)")
    ids.set_defaults(func=cmd_identities)
    cer = sub.add_parser("certs", help="make the bus's CA and the brokers' TLS certificate (tests, demos)")
    cer.add_argument("dir")
    cer.add_argument("--host", action="append", default=None, help="a name or address the brokers answer at "
                     "(repeat; default localhost, 127.0.0.1, ::1)")
    cer.set_defaults(func=cmd_certs)
    cl = sub.add_parser("cluster-layout", help="write what compose.yaml mounts (NATS nodes, NKeys, TLS, settings)")
    cl.add_argument("dir")
    cl.add_argument("--policy-dir", default="policies", help="the bundle whose catalog's endpoints are protected")
    cl.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                    help="a model server the invokers reach (repeat)")
    cl.add_argument("--signer", action="append", default=[], metavar="FILE.pub.json", help="a pinned policy signer")
    cl.add_argument("--nodes", type=int, default=3)
    cl.set_defaults(func=cmd_cluster_layout)
    con = sub.add_parser("contracts", help="write the edge's OpenAPI and the bus's AsyncAPI documents")
    con.add_argument("--write", default="docs", metavar="DIR", help="folder to write them into (default: docs)")
    con.set_defaults(func=cmd_contracts)
    vi = sub.add_parser("violations", help="denials with the rule that fired")
    vi.add_argument("--since", help="ISO date or timestamp, e.g. 2026-11-25 or 2026-11-25T09:00")
    vi.add_argument("--rule", help="only this rule id, e.g. no-write-down")
    vi.add_argument("--team", help="only this team")
    vi.add_argument("--follow", action="store_true", help="stream new denials live (the SOC feed)")
    vi.add_argument("--json", action="store_true", help="one JSON object per line, every column")
    vi.add_argument("--data-dir", default="var")
    vi.set_defaults(func=cmd_violations)
    rep = sub.add_parser("report", help="reports over the Parquet audit").add_subparsers(dest="report", required=True)
    rs = rep.add_parser("spend", help="where the AI budget went")
    rs.add_argument("--by", choices=["team", "model", "day"], default="team")
    rs.add_argument("--since", help="ISO date or timestamp (UTC)")
    rs.add_argument("--plot", help="also draw a PNG bar chart here, e.g. spend.png")
    rs.add_argument("--data-dir", default="var")
    rs.set_defaults(func=cmd_report_spend)
    rq = rep.add_parser("request", help="one request's timeline: every event of its life, digests, never text")
    rq.add_argument("request_id")
    rq.add_argument("--data-dir", default="var")
    rq.set_defaults(func=cmd_report_request)
    rr = rep.add_parser("refusals", help="refusals by team, code and rule (denials, spend caps, rate limits)")
    rr.add_argument("--since", help="ISO date or timestamp (UTC)")
    rr.add_argument("--data-dir", default="var")
    rr.set_defaults(func=cmd_report_refusals)
    cs = sub.add_parser("console", help="the read-only web console (spend, violations, timelines, register, evidence)")
    cs.add_argument("--config", default="gateway.toml")
    cs.add_argument("--data-dir", help="the gateway's data dir (default: the config's)")
    cs.add_argument("--host", help="default: [console] host, 127.0.0.1")
    cs.add_argument("--port", type=int, help="default: [console] port, 8090; 0: any free port")
    cs.add_argument("--screenshots", metavar="DIR", help="write a PNG of each page into DIR and exit (Playwright)")
    cs.add_argument("--request", help="with --screenshots: the request whose timeline to photograph")
    cs.set_defaults(func=cmd_console)
    st = sub.add_parser("status", help="stream and consumer state")
    st.add_argument("--data-dir", default="var")
    st.set_defaults(func=cmd_status)
    q = sub.add_parser("sql", help="SQL over the Parquet audit; the table is `events`")
    q.add_argument("query")
    q.add_argument("--data-dir", default="var")
    q.set_defaults(func=cmd_sql)
    return p


def _operator_error(exc: Exception) -> tuple[str, int] | None:
    """The one line and exit code for a failure the operator caused and can fix; None for any other."""
    from nats.errors import NoServersError

    from .config import ConfigError
    from .deployment import DeploymentError
    from .procs import StartFailed
    from .services.policy import PolicyError

    if isinstance(exc, ConfigError):
        return f"configuration refused: {exc}", 2
    if isinstance(exc, PolicyError):
        return f"policy refused: {exc}", 1
    if isinstance(exc, DeploymentError | StartFailed):
        return str(exc), 1
    if isinstance(exc, NoServersError) or (isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED):
        return f"the broker is not reachable (is `gateway up` running?): {exc}", 1
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"a port is taken: {exc}", 1
    if isinstance(exc, OSError) and exc.filename:  # a path the configuration names: not a file, no access
        return f"{exc.filename}: {exc.strerror or exc}", 1
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gateway` script."""
    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except Exception as exc:
        known = _operator_error(exc)
        if known is None:
            raise  # not the operator's doing: a bug, whose traceback must stay visible
        console.print(f"[red]gateway {args.command}:[/] {escape(known[0])}", soft_wrap=True)
        return known[1]
    return result


if __name__ == "__main__":
    sys.exit(main())
