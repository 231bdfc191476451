"""The console's HTTP side: sessions, the pages, and an audit event for every view.

A viewer signs in with a session token, verified like any request's (the active policy's issuer
keys, its lifetime bound); its roles must include one of `[console] roles`. The token is kept in
an HttpOnly, SameSite=Strict cookie and verified again on every page. Every page asked for,
refused ones included, is a `ConsoleViewed` event on the stream before the page is sent; if the
stream cannot record it, the page is not sent (AU-5).

The console runs beside the data dir with the operator's credential, as the CLI does: browsers
reach only its pages, never the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg

from .. import replay_cli, reports
from ..evidence import export as export_evidence
from ..evidence import register_of
from ..replay.engine import replay
from ..schemas import codec, subjects
from ..schemas.events import AuditCheckpoint, ConsoleViewed, RequestDenied, envelope
from ..services import bus, keys
from ..services.auditor import checkpoints
from ..services.authz.decider import AuthzPolicy
from ..services.authz.policy_view import compile_view, dev_jwks
from ..services.authz.tokens import TokenDefect, verify
from ..services.policy import bundle_from_files
from ..services.policy.feed import latest_valid
from ..services.settings import WorkerSettings
from ..violations import list_violations
from . import charts

log = logging.getLogger("enclave_gateway.console")
COOKIE = "gw_console"
POLICY_FRESH_S = 15.0  # how long a compiled policy serves before the stream is asked for a newer one
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NEXT = re.compile(r"^/(?!/)[A-Za-z0-9/_?=&.%-]{0,200}$")  # a path of ours: no scheme, host, space or control
SESSIONS = 10_000
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                                           "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
                                           "base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
LIVE_PER_VIEWER, LIVE_IN_ALL = 4, 64
TEAM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RULE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ASSESSOR = "assessor"  # the role that may replay and export from the console
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Viewer(msgspec.Struct, frozen=True):
    subject: str
    team: str
    roles: tuple[str, ...]


class Console:
    """One console: the data dir it shows, the bus it records views on, the roles it admits."""

    def __init__(self, settings: WorkerSettings, nc: Client, roles: list[str]) -> None:
        self.settings, self.nc, self.js = settings, nc, nc.jetstream()
        self.data_dir = Path(settings.data_dir)
        self.audit_dir = self.data_dir / "audit"
        self.roles = frozenset(roles)
        # sign-ins: a random id (the cookie) to the session token it proved. The cookie is never the
        # token itself: browsers send a host's cookies to its every port, and a token is an API key.
        self.sessions: dict[str, str] = {}
        self.hosts: set[str] = set()  # the Host headers this console answers (DNS rebinding: refused)
        self.live: dict[str, int] = {}  # open live feeds per viewer
        self.heavy = asyncio.Lock()  # one replay or export at a time: each reads the whole stream
        self._policy: AuthzPolicy | None = None
        self._policy_at = 0.0
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("enclave_gateway.console", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)
        self.templates.globals["zip"] = zip

    async def policy(self) -> AuthzPolicy | None:
        """The active policy's authz view (its issuer keys verify sessions), refreshed now and then."""
        if self._policy is None or time.monotonic() - self._policy_at > POLICY_FRESH_S:
            active = latest_valid(await self.activations(), self.settings.policy_signers)
            if active is not None:
                self._policy = compile_view(bundle_from_files(active.files), dev_jwks(self.settings))
                self._policy_at = time.monotonic()
        return self._policy

    async def activations(self) -> list[tuple[bytes, str, int]]:
        return await bus.stored_on(self.js, subjects.policy_activated(), "admin")

    async def viewer(self, request: web.Request) -> Viewer | str:
        """Who asks, or why nobody: the session's verified claims, or the reason it is refused."""
        token = self.sessions.get(request.cookies.get(COOKIE, ""), "")
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        return await self.session(token)

    def sign_in(self, token: str) -> str:
        """A new session id for a verified token (the oldest sessions go past SESSIONS)."""
        while len(self.sessions) >= SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = token
        return sid

    async def session(self, token: str) -> Viewer | str:
        """The viewer a session token proves, or why it proves none."""
        if not token:
            return "no session"
        policy = await self.policy()
        if policy is None:
            return "no policy is active: no session can be verified"
        claims = verify(token, policy.keys, datetime.now(UTC), policy.tokens, policy.max_token_lifetime_s)
        if isinstance(claims, TokenDefect):
            return f"{claims.code}: {claims.detail}"
        return Viewer(subject=claims.subject, team=claims.team, roles=tuple(claims.roles))

    async def record(self, page: str, status: int, viewer: Viewer | None, target: str | None = None) -> None:
        """The view as a fact on the stream; raises when it cannot be stored (the page is then not sent)."""
        rid = uuid.uuid4().hex
        event = ConsoleViewed(**envelope(rid, "console", datetime.now(UTC), "n/a"),
                              viewer=viewer.subject if viewer else None, team=viewer.team if viewer else None,
                              roles=viewer.roles if viewer else (), page=page,
                              target=target[:200] if target else None, status=status)
        await bus.publish(self.js, event)

    def render(self, name: str, status: int = 200, **context: Any) -> web.Response:
        html = self.templates.get_template(name).render(**context)
        return web.Response(status=status, text=html, content_type="text/html", headers=PAGE_HEADERS)


def page(name: str, target: Callable[[web.Request], str | None] = lambda r: None, role: str | None = None,
         streamed: bool = False
         ) -> Callable[[Callable[[Console, web.Request, Viewer], Awaitable[web.StreamResponse]]], Handler]:
    """A page behind a session whose roles allow the console (and `role`, when given). Every view by
    a session is recorded, refused ones too, with the status it is answered (a failure as 500),
    before anything is sent; a `streamed` page is recorded as it opens. A request with no valid
    session is sent to sign in and is shown nothing, so it is no view (a web page could otherwise
    grow the audit trail at will, a review found)."""

    def wrap(body: Callable[[Console, web.Request, Viewer], Awaitable[web.StreamResponse]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            con: Console = request.app["console"]
            who = await con.viewer(request)
            asked = target(request)
            if isinstance(who, str):
                if request.method == "GET" and "Authorization" not in request.headers:
                    raise web.HTTPSeeOther(f"/login?next={request.path}")
                return con.render("refused.html", 401, why=f"no valid session ({who})", viewer=None)
            needed = {role} if role else con.roles
            if not needed & set(who.roles):
                await con.record(name, 403, who, asked)
                return con.render("refused.html", 403, viewer=who, why=(
                    f"the roles of {who.subject} ({', '.join(who.roles) or 'none'}) do not include "
                    f"{' or '.join(sorted(needed))}"))
            if request.method == "POST" and not _same_origin(request):
                await con.record(name, 403, who, "cross-origin POST")
                return con.render("refused.html", 403, viewer=who, why="a form posted from another origin")
            if streamed:
                await con.record(name, 200, who, asked)
                return await body(con, request, who)
            try:
                response = await body(con, request, who)
            except web.HTTPException as exc:
                await con.record(name, exc.status, who, asked)
                raise
            except Exception:
                await con.record(name, 500, who, asked)
                raise
            await con.record(name, response.status, who, asked)
            return response

        return handler

    return wrap


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


async def login_form(request: web.Request) -> web.StreamResponse:
    con: Console = request.app["console"]
    return con.render("login.html", next=_next(request.query.get("next")), error=None, viewer=None)


async def login(request: web.Request) -> web.StreamResponse:
    """A pasted session token: verified, its roles checked, then kept in an HttpOnly cookie."""
    con: Console = request.app["console"]
    form = await request.post()
    token = str(form.get("token", "")).strip()
    nxt = _next(str(form.get("next", "/")))
    if not _same_origin(request):
        return con.render("login.html", 403, next=nxt, error="a sign-in posted from another origin", viewer=None)
    who = await con.session(token)
    if isinstance(who, str):
        await con.record("login", 401, None)
        return con.render("login.html", 401, next=nxt, error=f"not a valid session: {who}", viewer=None)
    if not con.roles & set(who.roles):
        await con.record("login", 403, who)
        return con.render("login.html", 403, next=nxt, viewer=None,
                          error=f"{who.subject}'s roles ({', '.join(who.roles) or 'none'}) do not open the console")
    await con.record("login", 200, who)
    response = web.Response(status=303, headers={"Location": nxt})
    response.set_cookie(COOKIE, con.sign_in(token), httponly=True, samesite="Strict", path="/",
                        secure=request.secure)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """Sign out: the session id is forgotten here, so the cookie opens nothing any more."""
    con: Console = request.app["console"]
    if not _same_origin(request):
        return con.render("refused.html", 403, viewer=None, why="a sign-out posted from another origin")
    token = con.sessions.pop(request.cookies.get(COOKIE, ""), None)
    if token is not None:
        who = await con.session(token)
        await con.record("logout", 200, who if isinstance(who, Viewer) else None)
    response = web.Response(status=303, headers={"Location": "/login"})
    response.del_cookie(COOKIE, path="/")
    return response


def _next(value: str | None) -> str:
    """Where to go after signing in: a path of ours, never another site."""
    return value if value and NEXT.match(value) else "/"


@page("home")
async def home(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    return con.render("home.html", viewer=who)


@page("spend", target=lambda r: r.query.get("by"))
async def spend(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    by = request.query.get("by", "team")
    by = by if by in ("team", "model", "day") else "team"
    cols, rows = await asyncio.to_thread(reports.spend, con.audit_dir, by)  # type: ignore[arg-type]
    caps = await asyncio.to_thread(reports.caps, con.audit_dir)
    policy = await con.policy()
    thresholds = {t: b.thresholds_pct for t, b in policy.bundle.budgets.teams.items()} if policy else {}
    try:
        live = reports.live_ledger_state(con.data_dir, con.settings)
        state, source = await asyncio.wait_for(live, 15), "live budget ledger"
    except Exception:  # the budget ledger's own projection could not be rebuilt: its recorded post-state
        state, source = await asyncio.to_thread(reports.recorded_ledger_state, con.audit_dir), "recorded ledger"
    mismatches = reports.compare(await asyncio.to_thread(reports.audited_spend_by_period, con.audit_dir), state)
    chart = charts.bars(f"Spend by {by} (micro-units)", [(str(r[0]), float(str(r[1] or 0))) for r in rows], "µ",
                        {k: float(v) for k, v in caps.items()} if by == "team" else None,
                        sorted({p for t in thresholds.values() for p in t}) if by == "team" else ())
    return con.render("spend.html", viewer=who, by=by, cols=cols, rows=rows, chart=chart, caps=caps,
                      thresholds=thresholds, source=source, mismatches=mismatches)


def _filters(request: web.Request) -> dict[str, str | None]:
    q = request.query
    rule = q.get("rule") or None
    team = q.get("team") or None
    since = q.get("since") or None
    if since:
        try:
            datetime.fromisoformat(since)
        except ValueError:
            since = None
    return {"rule": rule if rule and RULE.match(rule) else None, "team": team if team and TEAM.match(team) else None,
            "since": since}


@page("violations", target=lambda r: r.query_string[:200] or None)
async def violations(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    f = _filters(request)
    cols, rows = await asyncio.to_thread(list_violations, con.audit_dir, f["since"], f["rule"], f["team"])
    rules = sorted({str(r[cols.index("rule")]) for r in rows})
    return con.render("violations.html", viewer=who, cols=cols, rows=rows, filters=f, rules=rules)


@page("violations-live", target=lambda r: r.query_string[:200] or None, streamed=True)
async def violations_live(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    """Server-sent events: each new denial as it is stored (the subject the SOC feed follows). The
    session is checked again at every heartbeat: a feed ends with its session."""
    f = _filters(request)
    if con.live.get(who.subject, 0) >= LIVE_PER_VIEWER or sum(con.live.values()) >= LIVE_IN_ALL:
        return web.Response(status=429, text="too many live feeds open", headers={"Retry-After": "15"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "Content-Security-Policy": "default-src 'none'"})
    await response.prepare(request)
    con.live[who.subject] = con.live.get(who.subject, 0) + 1
    queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=1000)

    async def got(msg: Msg) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(msg)

    sub = await con.nc.subscribe("gw.evt.request.denied.>", cb=got)
    row = con.templates.get_template("violation_row.html")
    try:
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                if not isinstance(await con.viewer(request), Viewer):  # signed out, expired, keys changed
                    break
                await response.write(b": still here\n\n")
                continue
            try:
                bus.owner_of(con.js, msg.subject, msg.headers, msg.data)  # only authz's own denials
                e = codec.decode_as(msg.data, RequestDenied, msg.subject)
            except codec.DecodeError:
                continue
            team = e.caller.team if e.caller else None
            if (f["rule"] and e.rule != f["rule"]) or (f["team"] and team != f["team"]):
                continue
            html = row.render(r={"occurred_at": e.occurred_at.isoformat(), "caller": e.caller.subject if e.caller
                                 else None, "team": team, "rule": e.rule, "reason": e.reason, "model": e.model,
                                 "clearance": e.caller.clearance if e.caller else None, "input_label": e.input_label,
                                 "output_label": e.output_label, "policy_version": e.policy_version,
                                 "request_id": e.request_id})
            # one line: a carriage return in a caller's model name would end the event early (a review)
            await response.write(b"data: " + re.sub(r"[\r\n\u2028\u2029\x85]", " ", html).encode() + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        con.live[who.subject] -= 1
        await sub.unsubscribe()
    return response


@page("request", target=lambda r: r.query.get("id"))
async def request_page(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    rid = request.query.get("id", "").strip()
    cols: list[str] = []
    rows: list[tuple[object, ...]] = []
    error = None
    if rid and not REQUEST_ID.match(rid):
        error, rid = "a request id is letters, digits, - and _ (at most 64)", ""
    elif rid:
        cols, rows = await asyncio.to_thread(reports.timeline, con.audit_dir, rid)
        if not rows:
            error = f"no audited event of request {rid}"
    return con.render("request.html", viewer=who, rid=rid, cols=cols, rows=rows, error=error)


@page("register")
async def register(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    reg = register_of(con.settings, await con.activations())
    return con.render("register.html", viewer=who, reg=reg)


async def _evidence_context(con: Console) -> dict[str, Any]:
    checkpoint, signed = None, None
    with contextlib.suppress(Exception):  # no checkpoint yet
        raw = await con.js.get_last_msg(subjects.STREAM, subjects.audit_checkpoint(), direct=True)
        checkpoint = codec.decode_as(raw.data or b"", AuditCheckpoint, raw.subject)
        signer = keys.public_of(keys.load_private(con.settings.audit_key_file))
        signed = checkpoints.signed_by(checkpoint, signer)
    info = await con.js.stream_info(subjects.STREAM)
    return {"checkpoint": checkpoint, "signed": signed, "last_seq": info.state.last_seq,
            "replayed": replay_cli.load_last(con.data_dir), "exports": _exports(con.data_dir)}


def _exports(data_dir: Path) -> list[str]:
    folder = data_dir / "evidence"
    return sorted((p.name for p in folder.iterdir() if (p / "manifest.json").exists()), reverse=True) \
        if folder.is_dir() else []


@page("evidence")
async def evidence(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    return con.render("evidence.html", viewer=who, message=None, **await _evidence_context(con))


@page("evidence-replay", role=ASSESSOR)
async def evidence_replay(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    """Re-decide every recorded decision now, and keep the outcome (what `gateway replay` does)."""
    if con.heavy.locked():
        raise web.HTTPConflict(text="a replay or an export is running: try again when it is done")
    async with con.heavy:
        stored = [(seq, subject, data) for data, subject, seq in
                  await bus.stored_on(con.js, subjects.ALL_EVENTS, "admin")]
        result = await asyncio.to_thread(replay, stored, dev_jwks(con.settings), 0, None, None,
                                         con.settings.policy_signers)
        last = replay_cli.save_last(con.data_dir, result, stored)
    message = (f"replayed {last.decisions} decisions: {last.reproduced} reproduced, {last.mismatches} mismatches")
    return con.render("evidence.html", viewer=who, message=message, **await _evidence_context(con))


@page("evidence-export", role=ASSESSOR)
async def evidence_export(con: Console, request: web.Request, who: Viewer) -> web.StreamResponse:
    """Write the evidence package into the data dir (what `gateway evidence export` does)."""
    if con.heavy.locked():
        raise web.HTTPConflict(text="a replay or an export is running: try again when it is done")
    out = con.data_dir / "evidence" / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    async with con.heavy:
        manifest = await export_evidence(con.settings, out)
    message = f"exported {manifest.events} events (seq {manifest.first_seq}..{manifest.last_seq}) to {out}"
    return con.render("evidence.html", viewer=who, message=message, **await _evidence_context(con))


@web.middleware
async def _our_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only the Host this console was started on: a page elsewhere that points its own name at
    127.0.0.1 (DNS rebinding) reaches nothing here."""
    con: Console = request.app["console"]
    if con.hosts and request.host not in con.hosts:
        return web.Response(status=421, text="this console answers only its own address")
    return await handler(request)


def build(con: Console) -> web.Application:
    app = web.Application(middlewares=[_our_host])
    app["console"] = con
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", home)
    app.router.add_get("/spend", spend)
    app.router.add_get("/violations", violations)
    app.router.add_get("/violations/live", violations_live)
    app.router.add_get("/request", request_page)
    app.router.add_get("/register", register)
    app.router.add_get("/evidence", evidence)
    app.router.add_post("/evidence/replay", evidence_replay)
    app.router.add_post("/evidence/export", evidence_export)
    for name, kind in (("console.css", "text/css"), ("follow.js", "text/javascript")):
        app.router.add_get(f"/static/{name}", _asset(name, kind))
    return app


def _asset(name: str, kind: str) -> Handler:
    """One file of ours, read from the package once (only these two are served: no path is joined)."""
    body = resources.files("enclave_gateway.console").joinpath("static", name).read_bytes()

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                                    "Cache-Control": "max-age=300"})

    return serve


@contextlib.asynccontextmanager
async def serving(settings: WorkerSettings, host: str, port: int, roles: list[str]) -> AsyncIterator[str]:
    """The console on host:port, recording on the settings' bus; yields its address."""
    nc = await bus.connect(settings, "admin", keep_trying=False)
    con = Console(settings, nc, roles)
    # live feeds never end by themselves: stopping waits for them a moment, then cuts them off
    runner = web.AppRunner(build(con), access_log=None, shutdown_timeout=2.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        con.hosts = {f"{host}:{bound}", *({f"localhost:{bound}"} if host == "127.0.0.1" else ())}
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()
        await nc.close()
