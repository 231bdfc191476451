"""Hard caps under concurrency, on a gateway of its own: two budget replicas as separate
processes racing one cap with 1,000 concurrent requests, and a budget worker killed between
reserve and settle (issue 5)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio
from aiohttp import web
from enclave_gateway import audit_sql, issuer, nats_auth, policy_admin, procs, runtime, supervisor
from enclave_gateway.broker import Broker
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import publish_signed, wait_for_event

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROOT = Path(__file__).resolve().parent.parent
RACE_CAP = 8_800  # about 100 worst-case reservations of the requests below
EXTRA_TEAMS = f"""
[teams.race]
cap_micros = {RACE_CAP}
period = "month"

[teams.crash]
cap_micros = 1_000_000
period = "month"

[teams.ratelimited]
cap_micros = 1_000_000_000
period = "month"

[teams.tokens]
cap_micros = 1_000_000_000
period = "month"
"""
RPM = 100  # team ratelimited's requests per minute
SLOW_MODEL = """
[[model]]
id = "blackhole-tiny"
endpoint = "blackhole"
context_length = 512
default_max_tokens = 4
prompt_micros_per_1k = 2000
completion_micros_per_1k = 6000

[[model]]
id = "slow-tiny"
endpoint = "slow"
context_length = 512
default_max_tokens = 4
prompt_micros_per_1k = 2000
completion_micros_per_1k = 6000
"""


@pytest.fixture(scope="module")
def race_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data, policies = tmp_path_factory.mktemp("race-data"), tmp_path_factory.mktemp("race-policies")
    for f in (ROOT / "policies").iterdir():
        shutil.copy(f, policies / f.name)
    with open(policies / "budgets.toml", "a") as fh:
        fh.write(EXTRA_TEAMS)
    with open(policies / "catalog.toml", "a") as fh:
        fh.write(SLOW_MODEL)
    with open(policies / "access_policy.csv", "a") as fh:
        fh.write("p, team:race, enclave-tiny\np, team:crash, slow-tiny\np, team:crash, blackhole-tiny\n"
                 "p, team:ratelimited, enclave-tiny\np, team:tokens, enclave-tiny\n")
    with open(policies / "admission.toml", "a") as fh:
        fh.write(f"\n[team.ratelimited]\nrequests_per_minute = {RPM}\n"
                 f"\n[team.tokens]\ntokens_per_minute = {2 * _token_bound(policies) - 1}\n")
    issuer.ensure_keys(data / "keys")
    return data, policies


def _token_bound(policies: Path) -> int:
    """What one request of `_submit` counts against a token limit until it is settled."""
    from enclave_gateway.services.budget import decider
    from enclave_gateway.services.policy import load_bundle

    bundle = load_bundle(policies)
    model = next(m for m in bundle.catalog.model if m.id == "enclave-tiny")
    chat = msgspec.json.decode(_submit("t"), type=SubmitRequest).chat
    from enclave_gateway.services import catalog

    return catalog.prompt_tokens_bound(chat, model) + decider.effective_max_tokens(model, chat)


@pytest.fixture(scope="module")
def race_broker(race_dirs: tuple[Path, Path]) -> Iterator[Broker]:
    data, _ = race_dirs
    nats_auth.ensure_creds(data / "creds", ("race",))
    b = Broker(data, creds_dir=data / "creds")
    b.start()
    yield b
    b.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def slow_endpoint(engine: str) -> AsyncIterator[str]:
    """An OpenAI-compatible proxy to the real engine that answers after 2 s: a window to kill in."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(2.0)
        async with aiohttp.ClientSession() as s, s.post(f"{engine}/v1/chat/completions", data=body,
                                                       headers={"Content-Type": "application/json"}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(10)  # a model server that hangs past the invoker's 8 s deadline
        return web.Response(status=504)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/blackhole/v1/chat/completions", never)
    runner = web.AppRunner(app)
    await runner.setup()
    port = procs.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


class RaceGateway:
    """Everything in this loop except budget, which runs as separate processes."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.budgets: list = []  # type: ignore[type-arg]
        self.n = 0

    def start_budget(self) -> None:
        self.n += 1
        proc = supervisor.spawn_worker(self.settings, "budget", f"budget-{self.n}")
        procs.wait_for_line(Path(self.settings.data_dir) / "logs" / f"budget-{self.n}.log", "budget consuming",
                            proc, 60)
        self.budgets.append(proc)

    def kill_budgets(self) -> None:
        for proc in self.budgets:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.budgets = []


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def race(race_dirs: tuple[Path, Path], race_broker: Broker, engine: str,
               slow_endpoint: str) -> AsyncIterator[RaceGateway]:
    data, policies = race_dirs
    _, signer, _ = policy_admin.dev_signer(data / "keys")
    settings = WorkerSettings(nats_url=race_broker.url, data_dir=str(data), policy_dir=str(policies),
                              endpoints={"local-llama": engine, "slow": slow_endpoint,
                                         "blackhole": f"{slow_endpoint}/blackhole"},
                              http_port=procs.free_port(), creds_dir=str(data / "creds"), invoke_timeout_s=8.0,
                              budget_housekeeping_s=1.0, policy_signers={signer.kid: signer.public_key})
    supervisor.write_settings(settings)
    await runtime.setup_topology(settings)
    await runtime.activate(settings, policies, "race-test")
    stop = asyncio.Event()
    others = [n for n in supervisor.SERVICES if n != "budget"]
    task = asyncio.create_task(supervisor.run_all(settings, stop, others))
    gw = RaceGateway(settings)
    await asyncio.to_thread(gw.start_budget)
    await asyncio.to_thread(gw.start_budget)
    yield gw
    gw.kill_budgets()
    stop.set()
    await asyncio.wait_for(task, 30)


def _submit(token: str, model: str = "enclave-tiny") -> bytes:
    chat = ChatBody(model=model, messages=(ChatMessage(role="user", content="race"),), max_tokens=4, temperature=0.0)
    return codec.encode(SubmitRequest(token=token, chat=chat))


async def _ledger(admin: Client, team: str) -> list[dict[str, object]]:
    """Every ledger event of a team, in stream order."""
    js = admin.jetstream()
    sub = await js.subscribe(subjects.ledger_filter(team), ordered_consumer=True,
                             deliver_policy=nats.js.api.DeliverPolicy.ALL)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                break
            out.append(msgspec.json.decode(msg.data))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def _settled_down(admin: Client, team: str, timeout_s: float = 60.0) -> list[dict[str, object]]:
    """The team's ledger once nothing is reserved any more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = await _ledger(admin, team)
        if events and events[-1]["reserved_micros"] == 0:
            return events
        await asyncio.sleep(0.3)
    raise AssertionError(f"reservations of {team} never all settled")


async def test_a_thousand_concurrent_requests_never_overshoot_with_two_replicas(race: RaceGateway) -> None:
    assert len(race.budgets) == 2 and all(p.poll() is None for p in race.budgets)
    app, admin = await bus.connect(race.settings, "app.race"), await bus.connect(race.settings, "admin")
    try:
        await _until_two_pullers(admin)
        token = issuer.issue(Path(race.settings.data_dir) / "keys", subject="racer", team="race", ttl_s=3600)
        payload = _submit(token)
        replies = await asyncio.gather(*(app.request(subjects.submit("race"), payload, timeout=120) for _ in range(1000)))
        decoded = [codec.decode_reply(m.data) for m in replies]
        completed = [r for r in decoded if r.completion is not None]
        refused = [r for r in decoded if r.error is not None]
        assert len(completed) + len(refused) == 1000
        assert completed and refused
        assert {r.error.code for r in refused if r.error} == {"budget_exceeded"}

        ledger = await _settled_down(admin, "race")
        assert all(int(e["spent_micros"]) + int(e["reserved_micros"]) <= RACE_CAP for e in ledger)  # type: ignore[call-overload]
        reserved = [e for e in ledger if e["type"] == "BudgetReserved"]
        settled = [e for e in ledger if e["type"] == "BudgetSettled"]
        assert len(reserved) == len(completed) == len(settled)  # each admitted request settled exactly once
        assert len({e["request_id"] for e in settled}) == len(settled)
        spent = int(ledger[-1]["spent_micros"])  # type: ignore[call-overload]
        assert spent == sum(int(e["charged_micros"]) for e in settled)  # type: ignore[call-overload]

        await runtime.wait_audited(admin)
        _, rows = audit_sql.query(Path(race.settings.data_dir) / "audit",
                                  "SELECT sum(charged_micros), count(*) FROM events "
                                  "WHERE team = 'race' AND type = 'BudgetSettled'")
        assert rows[0] == (spent, len(settled))  # the Parquet audit reconciles to the micro-unit
    finally:
        await app.close()
        await admin.close()


async def _early_in_a_minute(seconds: int = 40) -> None:
    """Wait for the next UTC minute when fewer than `seconds` of this one are left: a test whose
    requests must share one rate-limit window."""
    second = time.gmtime().tm_sec
    if second > 60 - seconds:
        await asyncio.sleep(60.5 - second)


async def test_a_thousand_requests_racing_a_rate_limit_on_two_replicas_admit_no_more_than_it(
        race: RaceGateway) -> None:
    """Issue 12: 1,000 concurrent requests of a team limited to RPM requests a minute, decided by two
    budget replicas racing: each minute admits at most RPM, each admitted request read a distinct
    count, and every other request is refused `rate_limited` with a Retry-After."""
    from .conftest import stream_events

    assert len(race.budgets) == 2 and all(p.poll() is None for p in race.budgets)
    app, admin = await bus.connect(race.settings, "app.race"), await bus.connect(race.settings, "admin")
    try:
        await _until_two_pullers(admin)
        await _early_in_a_minute()
        token = issuer.issue(Path(race.settings.data_dir) / "keys", subject="rater", team="ratelimited", ttl_s=3600)
        payload = _submit(token)
        replies = await asyncio.gather(*(app.request(subjects.submit("race"), payload, timeout=120) for _ in range(1000)))
        decoded = [codec.decode_reply(m.data) for m in replies]
        completed = [r for r in decoded if r.completion is not None]
        refused = [r for r in decoded if r.error is not None]
        assert len(completed) + len(refused) == 1000 and completed and refused
        assert {r.error.code for r in refused if r.error} == {"rate_limited"}
        assert all(r.error and r.error.retry_after_s and 1 <= r.error.retry_after_s <= 60 for r in refused)

        reserved = [e for e in await _settled_down(admin, "ratelimited") if e["type"] == "BudgetReserved"]
        rejected = [b for _, b in await stream_events(admin, subject=subjects.budget_rejected("ratelimited"))]
        assert len(reserved) == len(completed) and len(rejected) == len(refused)
        by_minute: dict[str, list[int]] = {}
        attempts: dict[str, int] = {}
        for e in reserved:
            [count] = e["rates"]  # type: ignore[misc]
            by_minute.setdefault(count["window"], []).append(count["observed"])
            attempts[count["window"]] = attempts.get(count["window"], 0) + 1
        for e in rejected:
            assert e["reason"] == "rate_limited" and e["rates"][-1]["observed"] > RPM  # type: ignore[index]
            window = e["rates"][-1]["window"]  # type: ignore[index]
            attempts[window] = attempts.get(window, 0) + 1
        for window, observed in by_minute.items():
            assert len(observed) <= RPM, f"{len(observed)} admitted in the minute from {window}"
            assert len(set(observed)) == len(observed) and max(observed) <= RPM  # one count each, none over
            if attempts[window] > RPM:  # refusals never took the last slot from an admissible request
                assert sorted(observed) == list(range(1, RPM + 1)), window

        from enclave_gateway import cli, reports

        await runtime.wait_audited(admin)  # every refusal is an event, and counted in the report
        _, rows = reports.refusals(Path(race.settings.data_dir) / "audit")
        assert ("ratelimited", "rate_limited", "rate-limit-team", len(refused)) in rows, rows
        assert await asyncio.to_thread(cli.main, ["report", "refusals", "--data-dir", race.settings.data_dir]) == 0
    finally:
        await app.close()
        await admin.close()


async def test_a_token_limit_counts_the_bound_and_settles_on_actual_usage(race: RaceGateway) -> None:
    """Issue 12: a tokens-per-minute limit of twice one request's bound, less one. The first request
    counts its bound; its settlement gives back what the model did not use, which is what lets the
    second in. Requests go on until one is refused: each read exactly the tokens used before it plus
    its own bound. The refusal is HTTP 429 with Retry-After in OpenAI's error shape."""
    admin = await bus.connect(race.settings, "admin")
    app = await bus.connect(race.settings, "app.race")
    bound = _token_bound(Path(race.settings.policy_dir))
    limit = 2 * bound - 1
    try:
        await _early_in_a_minute()
        token = issuer.issue(Path(race.settings.data_dir) / "keys", subject="counter", team="tokens", ttl_s=3600)
        used = 0
        for attempt in range(12):
            reply = codec.decode_reply((await app.request(subjects.submit("race"), _submit(token), timeout=60)).data)
            if reply.error is not None:
                assert reply.error.code == "rate_limited" and attempt >= 2, reply.error  # the 2nd needed the give-back
                rejected = await wait_for_event(admin, reply.request_id, "BudgetRejected")
                [count] = rejected["rates"]  # type: ignore[misc]
                assert count["observed"] == used + bound > limit and count["kind"] == "tokens"
                break
            reserved = await wait_for_event(admin, reply.request_id, "BudgetReserved")
            [count] = reserved["rates"]  # type: ignore[misc]
            assert count["counted"] == bound and count["observed"] == used + bound <= limit
            settled = await wait_for_event(admin, reply.request_id, "BudgetSettled")
            used += int(settled["prompt_tokens"]) + int(settled["completion_tokens"])  # type: ignore[call-overload]
            assert used < bound * (attempt + 1)  # the model used less than the bound
            await _counter_reads(admin, subjects.rate_counter(count["window"], "team", "tokens", "tokens"), used)
        else:
            raise AssertionError("the token limit never refused")
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{race.settings.http_port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {token}"},
                json={"model": "enclave-tiny", "messages": [{"role": "user", "content": "race"}], "max_tokens": 4}
        ) as resp:
            body = await resp.json()
        assert resp.status == 429 and body["error"]["code"] == "rate_limited", body
        assert body["error"]["type"] == "rate_limit_error" and "tokens per minute" in body["error"]["message"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        await _counter_reads(admin, subjects.rate_counter(count["window"], "team", "tokens", "tokens"), used)
    finally:
        await app.close()
        await admin.close()


async def _counter_reads(admin: Client, subject: str, value: int, timeout_s: float = 10.0) -> None:
    """Wait until a rate counter holds `value` (a give-back lands just after its settlement)."""
    js, seen = admin.jetstream(), None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = await js.get_last_msg(subjects.RATES_STREAM, subject, direct=True)
        seen = int(msgspec.json.decode(msg.data or b"{}")["val"])
        if seen == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{subject} reads {seen}, not {value}")


async def _until_two_pullers(admin: Client) -> None:
    """Both replicas are fetching from the shared `budget` consumer, so they really race."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await admin.jetstream().consumer_info(subjects.STREAM, "budget")).num_waiting >= 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("two budget replicas are not both pulling")


async def test_spend_report_reconciles_with_the_budget_state_and_plots(race: RaceGateway, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from enclave_gateway import cli, reports

    admin = await bus.connect(race.settings, "admin")
    try:
        await _settled_down(admin, "race")
        await runtime.wait_audited(admin)
    finally:
        await admin.close()
    data_dir = Path(race.settings.data_dir)
    png = tmp_path / "spend.png"
    code = await asyncio.to_thread(cli.main, ["report", "spend", "--by", "team", "--plot", str(png),
                                              "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "reconciled" in out and "live budget ledger" in out, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    cols, rows = reports.spend(data_dir / "audit", "team")
    by_team = {r[0]: r for r in rows}
    audited = reports.audited_spend_by_period(data_dir / "audit")
    assert by_team["race"][1] == sum(v for (t, _), v in audited.items() if t == "race") > 0
    for by in ("model", "day"):
        _, other = reports.spend(data_dir / "audit", by)  # type: ignore[arg-type]
        assert sum(int(r[1]) for r in other) == sum(int(r[1]) for r in rows)  # type: ignore[call-overload]
    recorded = reports.recorded_ledger_state(data_dir / "audit")
    assert reports.compare(audited, recorded) == []
    tampered = {k: v + 1 for k, v in recorded.items()}
    assert len(reports.compare(audited, tampered)) == len(recorded)


async def test_killing_budget_between_reserve_and_settle_neither_double_charges_nor_leaks(
        race: RaceGateway) -> None:
    app, admin = await bus.connect(race.settings, "app.race"), await bus.connect(race.settings, "admin")
    try:
        token = issuer.issue(Path(race.settings.data_dir) / "keys", subject="victim", team="crash", ttl_s=3600)
        pending = asyncio.ensure_future(app.request(subjects.submit("race"), _submit(token, "slow-tiny"), timeout=60))
        rid = await _first_reserved(admin, "crash")
        race.kill_budgets()  # SIGKILL while the model server is still answering
        reply = codec.decode_reply((await pending).data)
        assert reply.request_id == rid and reply.completion is not None
        await wait_for_event(admin, rid, "InvocationCompleted")
        await asyncio.to_thread(race.start_budget)  # a restarted replica rebuilds and settles
        settled = await wait_for_event(admin, rid, "BudgetSettled", timeout_s=30)

        completed = await wait_for_event(admin, rid, "InvocationCompleted")
        redelivered = dict(completed, event_id=f"{rid}:invoke-redelivered")
        # a genuine invoker's second outcome for the request (signed as the invoker, so it counts)
        await publish_signed(admin.jetstream(), race.settings.creds_dir, "invoker",
                             subjects.invocation_completed("slow-tiny"), msgspec.json.encode(redelivered))
        await asyncio.sleep(1.5)
        ledger = await _settled_down(admin, "crash")
        mine = [e for e in ledger if e["request_id"] == rid]
        assert [e["type"] for e in mine] == ["BudgetReserved", "BudgetSettled"]  # no double charge
        assert ledger[-1]["reserved_micros"] == 0  # no leaked reservation
        assert ledger[-1]["spent_micros"] == settled["charged_micros"]
    finally:
        await asyncio.to_thread(race.start_budget)
        await app.close()
        await admin.close()


async def _first_reserved(admin: Client, team: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in await _ledger(admin, team):
            if e["type"] == "BudgetReserved":
                return str(e["request_id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no reservation")


async def test_a_lost_reservation_expires_by_an_event_and_the_late_failure_changes_nothing(
        race: RaceGateway, tmp_path: Path) -> None:
    """With a 1 s reservation TTL, a request stuck at a hung model server is released by the
    budget's housekeeping before the invoker's 8 s deadline; the late InvocationFailed is a no-op."""
    original = Path(race.settings.policy_dir)
    short = tmp_path / "short-ttl"
    shutil.copytree(original, short)
    budgets = (short / "budgets.toml").read_text()
    (short / "budgets.toml").write_text("reservation_ttl_s = 1\n" + budgets)
    app, admin = await bus.connect(race.settings, "app.race"), await bus.connect(race.settings, "admin")
    try:
        await runtime.activate(race.settings, short, "expiry-test")
        await asyncio.sleep(1.0)  # every replica switches on the activation
        token = issuer.issue(Path(race.settings.data_dir) / "keys", subject="lost", team="crash", ttl_s=3600)
        reply = codec.decode_reply((await app.request(subjects.submit("race"), _submit(token, "blackhole-tiny"),
                                                      timeout=60)).data)
        assert reply.error is not None and reply.error.code == "invocation_failed"  # after the 8 s deadline
        assert "every endpoint of 'blackhole-tiny' failed" in reply.error.message  # its only one
        rid = reply.request_id
        released = await wait_for_event(admin, rid, "BudgetReleased")
        failed = await wait_for_event(admin, rid, "InvocationFailed")
        assert released["reason"] == "expired"
        assert str(released["occurred_at"]) < str(failed["occurred_at"])  # expired while still hung
        await asyncio.sleep(1.0)
        mine = [e["type"] for e in await _ledger(admin, "crash") if e["request_id"] == rid]
        assert mine == ["BudgetReserved", "BudgetReleased"]  # released once, never charged
    finally:
        await runtime.activate(race.settings, original, "expiry-test-restore")
        await app.close()
        await admin.close()
