"""Issue 13: the web console in a real browser (Debian's Chromium driven by Playwright), over a data
dir the demo has filled, with every request outside loopback refused and recorded. The figures
shown are checked against `gateway report spend` and `gateway violations --json`; a session
without a console role gets 403; every view is an event on the stream."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from enclave_gateway import issuer, procs
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.events import RequestDenied, envelope
from enclave_gateway.services import bus
from enclave_gateway.supervisor import read_settings
from playwright.sync_api import Browser, Page, Route, sync_playwright

from .conftest import publish_signed

pytestmark = pytest.mark.timeout(600)
CHROMIUM = "/usr/bin/chromium"
ENV = {**os.environ, "COLUMNS": "240"}


def gateway(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclave_gateway.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


class Served:
    def __init__(self, data: Path, url: str, bus_url: str) -> None:
        self.data, self.url, self.bus_url = data, url, bus_url

    def token(self, role: str, subject: str = "ann") -> str:
        return issuer.issue(self.data / "keys", subject=subject, team="alpha", roles=(role,), ttl_s=3600)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("console") / "d"
    demo = gateway("demo", "--data-dir", str(data), timeout=400)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    port = procs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "enclave_gateway.cli", "console", "--data-dir", str(data),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    assert proc.stdout is not None
    line = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "console on" not in line:
        line += proc.stdout.readline()
    found = re.search(r"console on (http://\S+) \(bus (nats://\S+)\)", line)
    assert found, line
    try:
        yield Served(data, found.group(1), found.group(2))
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"])
        yield b
        b.close()


class Offline:
    """Every request a page makes, with the ones to anywhere but loopback refused and kept."""

    def __init__(self) -> None:
        self.outside: list[str] = []

    def __call__(self, route: Route) -> None:
        host = re.sub(r"^[a-z]+://", "", route.request.url).split("/", 1)[0].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()


def _page(browser: Browser, served: Served, role: str | None = "assessor", js: bool = True) -> tuple[Page, Offline]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, java_script_enabled=js)
    offline = Offline()
    context.route("**/*", offline)
    page = context.new_page()
    if role:  # a viewer of its own per page: a viewer may hold only a few live feeds open
        page.goto(f"{served.url}/login")
        page.fill("#token", served.token(role, subject=f"ann-{uuid.uuid4().hex[:8]}"))
        page.click("button[type=submit]")
    return page, offline


def _rows(page: Page, selector: str) -> list[list[str]]:
    return [[c.strip() for c in row] for row in
            page.eval_on_selector_all(f"{selector} tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")]


def test_spend_shows_what_the_spend_report_says_and_reconciles(browser: Browser, served: Served) -> None:
    page, offline = _page(browser, served)
    page.goto(f"{served.url}/spend")
    shown = {r[0]: r[1] for r in _rows(page, "#spend-rows")}
    report = gateway("report", "spend", "--by", "team", "--data-dir", str(served.data))
    assert report.returncode == 0, report.stdout + report.stderr
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in report.stdout.splitlines()
             if line.count("│") >= 6 and line.split("│")[1].strip() not in ("team", "")}
    assert shown == lines and {"alpha", "bravo"} <= set(shown), (shown, report.stdout)
    assert "Reconciled" in page.inner_text("#reconciled")
    assert page.locator("figure svg rect.bar").count() == len(shown)  # a bar per team, above the table
    assert page.locator("figure svg line.cap").count() == len(shown)  # each against its cap
    for by in ("model", "day"):
        page.goto(f"{served.url}/spend?by={by}")
        assert sum(int(r[1]) for r in _rows(page, "#spend-rows")) == sum(int(v) for v in shown.values())
    assert offline.outside == []


def test_violations_show_what_the_feed_says_filter_and_follow_live(browser: Browser, served: Served) -> None:
    page, offline = _page(browser, served)
    page.goto(f"{served.url}/violations")
    feed = gateway("violations", "--json", "--data-dir", str(served.data))
    assert feed.returncode == 0, feed.stderr
    expected = [json.loads(line) for line in feed.stdout.splitlines() if line.strip()]
    rows = _rows(page, "#violation-rows")
    assert len(rows) == len(expected) == int(page.inner_text("#count")) > 0
    assert {r[-1] for r in rows} == {e["request_id"] for e in expected}
    assert {"content-marking", "no-write-down", "team-model-access"} <= {r[3] for r in rows}
    page.goto(f"{served.url}/violations?rule=content-marking")
    assert [r[3] for r in _rows(page, "#violation-rows")] == ["content-marking"]
    page.goto(f"{served.url}/violations?team=bravo")
    assert {r[2] for r in _rows(page, "#violation-rows")} == {"bravo"}

    page.goto(f"{served.url}/violations")
    page.wait_for_selector("#live:not([hidden])")
    before = len(_rows(page, "#violation-rows"))
    denied = RequestDenied(**envelope("live-1", "authz", datetime.now(UTC), "sha256:test"), reason="write_down",
                           rule="no-write-down", detail="<b>x</b>", model="<script>alert(1)</script>",
                           reply_to="_INBOX.x")
    _on_bus(served, lambda js: _as_authz(served, js, denied))
    _until_more_rows(page, before)
    first = _rows(page, "#violation-rows")[0]
    assert first[-1] == "live-1" and first[5] == "<script>alert(1)</script>"  # shown as text, never run
    assert offline.outside == []


def test_a_request_timeline_shows_its_life_without_its_text(browser: Browser, served: Served) -> None:
    page, offline = _page(browser, served)
    page.goto(f"{served.url}/violations?rule=content-marking")
    page.click("#violation-rows a")
    types = [r[2] for r in _rows(page, "#timeline")]
    assert types[:2] == ["RequestSubmitted", "RequestDenied"], types
    body = page.inner_text("main")
    assert "content-marking" in body and "convoy" not in body  # the prompt never shows, its digest does
    page.goto(f"{served.url}/request?id=no-such-request")
    assert "no audited event" in page.inner_text("main")
    page.goto(f"{served.url}/request?id=%3Cscript%3E")
    assert "letters, digits" in page.inner_text("main")
    assert offline.outside == []


def test_the_register_and_the_evidence_page(browser: Browser, served: Served) -> None:
    page, offline = _page(browser, served)
    page.goto(f"{served.url}/register")
    models = {r[0]: r for r in _rows(page, "#models tbody")}
    assert models["analyst-large"][1] == "TOP SECRET//SI/TK//NOFORN" and "enclave-tiny" in models
    versions = [r[1] for r in _rows(page, "#policies tbody")]
    assert page.inner_text("#in-force") == versions[0]
    page.goto(f"{served.url}/evidence")
    assert "verified" in page.inner_text("#signature")
    page.click("form[action='/evidence/replay'] button")
    assert re.search(r"(\d+) reproduced, 0 mismatches", page.inner_text("#message"))
    page.click("form[action='/evidence/export'] button")
    exported = re.search(r"to (\S+)$", page.inner_text("#message"))
    assert exported and (Path(exported.group(1)) / "manifest.json").exists()
    verified = gateway("evidence", "verify", exported.group(1), "--audit-key",
                       str(served.data / "keys" / "audit-signer.pub.json"))
    assert verified.returncode == 0, verified.stdout
    assert offline.outside == []


def test_a_session_without_a_console_role_gets_403_and_every_view_is_recorded(browser: Browser,
                                                                              served: Served) -> None:
    page, _ = _page(browser, served, role=None)
    page.goto(f"{served.url}/spend")
    assert page.url.startswith(f"{served.url}/login")  # no session: sign in first
    page.fill("#token", served.token("developer", subject="dev"))
    page.click("button[type=submit]")
    assert "do not open the console" in page.inner_text(".error")
    response = page.request.get(f"{served.url}/spend", headers={"Authorization": f"Bearer {served.token('developer')}"})
    assert response.status == 403
    analyst, _ = _page(browser, served, role="analyst")
    analyst.goto(f"{served.url}/evidence")
    analyst.click("form[action='/evidence/export'] button")  # exports are the assessor's
    assert "assessor" in analyst.inner_text(".error")

    def views(js: object) -> list[dict[str, object]]:
        async def read() -> list[dict[str, object]]:
            return [msgspec.json.decode(d) for d, _, _ in
                    await bus.stored_on(js, subjects.console_viewed(), "admin")]  # type: ignore[arg-type]
        return read()  # type: ignore[return-value]

    recorded = _on_bus(served, views)
    assert {(v["page"], v["status"]) for v in recorded} >= {("login", 403), ("spend", 403),
                                                            ("evidence-export", 403), ("spend", 200)}
    assert any(v["viewer"] == "dev" and v["status"] == 403 for v in recorded)


def test_a_hostile_review_of_the_console(browser: Browser, served: Served) -> None:
    """What a review broke: the cookie was the API token (sent to every local port), requests with no
    session grew the audit trail, another site's name reached it (DNS rebinding), `next` led off
    site, a carriage return in a model name hid a denial from the live feed, and a negative UTC
    offset in a filter failed."""
    import urllib.error
    import urllib.request

    page, _ = _page(browser, served)
    [cookie] = page.context.cookies()
    token = served.token("assessor")
    assert cookie["name"] == "gw_console" and "." not in cookie["value"] and cookie["httpOnly"]  # no JWT in it

    def count_views(js: object) -> object:
        async def read() -> int:
            return len(await bus.stored_on(js, subjects.console_viewed(), "admin"))  # type: ignore[arg-type]
        return read()

    before = _on_bus(served, count_views)
    for _ in range(20):  # no session: sent to sign in, shown nothing, recorded nothing
        with urllib.request.urlopen(f"{served.url}/violations?{'x' * 150}") as r:
            assert r.url.startswith(f"{served.url}/login")
    assert _on_bus(served, count_views) == before

    request = urllib.request.Request(f"{served.url}/spend", headers={"Host": f"rebound.example:{served.url.rsplit(':', 1)[1]}",
                                                                     "Authorization": f"Bearer {token}"})
    try:
        urllib.request.urlopen(request)
        raise AssertionError("another host name was answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 421

    fresh, _ = _page(browser, served, role=None)
    fresh.goto(f"{served.url}/login?next=/%09/evil.example/phish")
    fresh.fill("#token", token)
    fresh.click("button[type=submit]")
    fresh.wait_for_load_state()
    assert fresh.url == f"{served.url}/"

    page.goto(f"{served.url}/violations?since=2020-01-01T00:00-05:00")
    assert int(page.inner_text("#count")) > 0
    page.goto(f"{served.url}/violations")
    page.wait_for_selector("#live:not([hidden])")
    before_rows = len(_rows(page, "#violation-rows"))
    hidden = RequestDenied(**envelope("live-cr", "authz", datetime.now(UTC), "sha256:test"), reason="write_down",
                           rule="no-write-down", detail="d", model="gpt\revent: nothing-to-see", reply_to="_INBOX.x")
    _on_bus(served, lambda js: _as_authz(served, js, hidden))
    _until_more_rows(page, before_rows)
    assert _rows(page, "#violation-rows")[0][-1] == "live-cr"

    page.click("header form button")  # sign out: the session id opens nothing any more
    stale = page.request.get(f"{served.url}/spend", headers={"Cookie": f"gw_console={cookie['value']}"},
                             max_redirects=0)
    assert stale.status == 303 and "/login" in stale.headers["location"]


def test_pages_work_without_javascript_and_fit_1280_by_800(browser: Browser, served: Served) -> None:
    page, offline = _page(browser, served, js=False)
    page.goto(f"{served.url}/violations")
    assert len(_rows(page, "#violation-rows")) > 0  # the table is the server's, no script needed
    page.goto(f"{served.url}/spend")
    assert len(_rows(page, "#spend-rows")) > 0
    wide, _ = _page(browser, served)
    for path in ("/spend", "/violations", "/register", "/evidence", "/request"):
        wide.goto(f"{served.url}{path}")
        assert wide.evaluate("document.documentElement.scrollWidth") <= 1280, path
    assert offline.outside == []


def _until_more_rows(page: Page, before: int, timeout_s: float = 20.0) -> None:
    """Wait for the live feed to add a row (polled from here: the page's CSP forbids evaluated strings)."""
    deadline = time.monotonic() + timeout_s
    while len(_rows(page, "#violation-rows")) <= before:
        assert time.monotonic() < deadline, "no row arrived on the live feed"
        page.wait_for_timeout(100)


def _as_authz(served: Served, js: object, event: RequestDenied) -> object:
    """A denial as authz stores it: signed by authz, the owner of denials (anything else is not shown)."""
    return publish_signed(js, read_settings(served.data).creds_dir, "authz",  # type: ignore[arg-type]
                          subjects.for_event(event), codec.encode(event))


def _on_bus(served: Served, work: object) -> object:
    """Run `work(js)` against the console's bus as the operator, in a thread of its own."""

    async def run() -> object:
        settings = msgspec.structs.replace(read_settings(served.data), nats_url=served.bus_url)
        nc = await bus.connect(settings, "admin", keep_trying=False)
        try:
            return await work(nc.jetstream())  # type: ignore[operator]
        finally:
            await nc.close()

    import asyncio

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(60)

