"""Budget as a pure function: worst case, settle, release, idempotency, the cap invariant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import (
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    Caller,
    InvocationCompleted,
    InvocationFailed,
    RequestAuthorized,
    RequestFailed,
    Reservation,
)
from enclave_gateway.schemas.policy import Budgets, PolicyBundle, TeamBudget
from enclave_gateway.services import catalog
from enclave_gateway.services import remembered
from enclave_gateway.services.budget import decider
from enclave_gateway.services.policy import load_bundle
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
BASE = load_bundle(ROOT / "policies")
MODEL = catalog.find(BASE.catalog, "enclave-tiny")
assert MODEL is not None


def bundle(cap: int, thresholds: tuple[int, ...] = (), ttl_s: int = 900) -> PolicyBundle:
    team = TeamBudget(cap_micros=cap, period="month", thresholds_pct=thresholds)
    return msgspec.structs.replace(BASE, budgets=Budgets(teams={"t": team}, reservation_ttl_s=ttl_s))


def authorized(rid: str, text: str = "hello", max_tokens: int | None = 8, team: str = "t") -> RequestAuthorized:
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=text),), max_tokens=max_tokens)
    return RequestAuthorized(event_id=f"{rid}:authz", request_id=rid, occurred_at=NOW, policy_version="p",
                             caller=Caller(subject="s", team=team), model_id="enclave-tiny", chat=chat, reply_to="")


def completed(rid: str, held: Reservation, prompt: int, completion: int) -> InvocationCompleted:
    return InvocationCompleted(event_id=f"{rid}:invoke", request_id=rid, occurred_at=NOW, policy_version="p",
                               caller=Caller(subject="s", team="t"), model_id="enclave-tiny", endpoint="e",
                               prompt_tokens=prompt, completion_tokens=completion, finish_reason="length",
                               content="x", latency_ms=1.0, reservation=held, reply_to="")


def failed(rid: str, held: Reservation, final: bool = True) -> InvocationFailed:
    """A failure that ends its request (every v1 failure); a non-final one is a retried attempt."""
    return InvocationFailed(event_id=f"{rid}:invoke", request_id=rid, occurred_at=NOW, policy_version="p",
                            caller=Caller(subject="s", team="t"), model_id="enclave-tiny", endpoint="e",
                            error="timeout", detail="", latency_ms=1.0, reservation=held, reply_to="", final=final)


def run(events: list, state: decider.BudgetState, policy: PolicyBundle):  # type: ignore[no-untyped-def,type-arg]
    out = []
    for e in events:
        for d in decider.decide(e, state, policy, NOW):
            state = decider.evolve(state, d)
            out.append(d)
    return out, state


def test_worst_case_bounds_the_real_token_count_of_a_byte_level_model() -> None:
    chat = authorized("r", text="héllo wörld " * 20).chat
    assert catalog.prompt_tokens_bound(chat, MODEL) >= len("héllo wörld ".encode() * 20) + 16


def test_max_tokens_is_cut_to_the_models_max_output_and_so_is_the_reservation() -> None:
    assert MODEL is not None
    capped = msgspec.structs.replace(MODEL, max_output_tokens=16)
    chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content="x"),), max_tokens=400)
    assert decider.effective_max_tokens(capped, chat) == 16
    assert decider.effective_max_tokens(MODEL, chat) == 400


def test_max_tokens_defaults_and_is_bounded_by_context() -> None:
    assert decider.effective_max_tokens(MODEL, authorized("r", max_tokens=None).chat) == MODEL.default_max_tokens
    assert decider.effective_max_tokens(MODEL, authorized("r", max_tokens=10**6).chat) == MODEL.context_length


def test_reserve_then_settle_charges_actual_and_releases_the_rest() -> None:
    [reserved], state = run([authorized("r1")], decider.initial_state(), bundle(10_000))
    assert isinstance(reserved, BudgetReserved) and reserved.reserved_micros == reserved.amount_micros
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)
    [settled], state = run([completed("r1", held, 10, 8)], state, bundle(10_000))
    assert isinstance(settled, BudgetSettled)
    assert settled.charged_micros == catalog.cost_micros(MODEL, 10, 8) < reserved.amount_micros
    assert (settled.spent_micros, settled.reserved_micros) == (settled.charged_micros, 0)
    assert state.open == {}


def test_failure_releases_and_redelivery_decides_nothing() -> None:
    [reserved], state = run([authorized("r1")], decider.initial_state(), bundle(10_000))
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    [released], state = run([failed("r1", held)], state, bundle(10_000))
    assert isinstance(released, BudgetReleased) and released.reserved_micros == 0 and released.spent_micros == 0
    again, _ = run([failed("r1", held), completed("r1", held, 1, 1)], state, bundle(10_000))
    assert again == []


def test_a_failed_attempt_the_router_retries_releases_nothing() -> None:
    [reserved], state = run([authorized("r1")], decider.initial_state(), bundle(10_000))
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    assert decider.decide(failed("r1", held, final=False), state, bundle(10_000), NOW) == []
    assert "r1" in state.open


def test_a_reserved_request_redelivered_is_not_reserved_twice() -> None:
    out, _ = run([authorized("r1"), authorized("r1")], decider.initial_state(), bundle(10_000))
    assert len(out) == 1


def test_over_cap_is_rejected_with_remaining_and_requested() -> None:
    out, _ = run([authorized(f"r{i}") for i in range(5)], decider.initial_state(), bundle(300))
    rejected = [e for e in out if isinstance(e, BudgetRejected)]
    reserved = [e for e in out if isinstance(e, BudgetReserved)]
    assert reserved and rejected
    assert rejected[0].requested_micros > rejected[0].remaining_micros
    assert rejected[0].remaining_micros == 300 - sum(e.amount_micros for e in reserved)


def test_team_without_a_budget_fails_closed() -> None:
    [event], _ = run([authorized("r", team="ghost")], decider.initial_state(), bundle(10_000))
    assert isinstance(event, BudgetRejected) and event.reason == "budget_not_configured"


def test_a_server_reporting_more_than_the_bound_is_charged_at_most_the_reservation() -> None:
    [reserved], state = run([authorized("r1")], decider.initial_state(), bundle(10_000))
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    [settled], _ = run([completed("r1", held, 10_000, 10_000)], state, bundle(10_000))
    assert settled.charged_micros == held.micros  # type: ignore[attr-defined]


def test_period_rollover_starts_a_fresh_ledger() -> None:
    assert decider.period_of("month", NOW) == "2026-11"
    assert decider.period_of("day", NOW) == "2026-11-25"


class CapMachine(RuleBasedStateMachine):
    """Any interleaving of reserve/settle/release keeps spent + reserved <= cap (DESIGN §4)."""

    CAP = 2_000

    def __init__(self) -> None:
        super().__init__()
        self.state = decider.initial_state()
        self.policy = bundle(self.CAP)
        self.n = 0
        self.seen: list[RequestAuthorized] = []

    def _apply(self, event) -> None:  # type: ignore[no-untyped-def]
        decided = decider.decide(event, self.state, self.policy, NOW)
        for d in decided:
            self.state = decider.evolve(self.state, d)
        # the equinox property: once its decided events are folded in, the same input decides nothing
        again = decider.decide(event, self.state, self.policy, NOW)
        assert again == [], again

    @rule(data=st.data())
    def an_authorization_arrives_again(self, data: st.DataObject) -> None:
        """A redelivery after the duplicate window, or a copy stored by abuse (docs/security.md)."""
        if self.seen:
            event = data.draw(st.sampled_from(self.seen))
            assert decider.decide(event, self.state, self.policy, NOW) == [] or (
                event.request_id not in self.state.open and event.request_id not in self.state.closed)

    @rule(text=st.text(max_size=60), max_tokens=st.one_of(st.none(), st.integers(1, 600)))
    def reserve(self, text: str, max_tokens: int | None) -> None:
        self.n += 1
        event = authorized(f"r{self.n}", text=text, max_tokens=max_tokens)
        self.seen.append(event)
        self._apply(event)

    @rule(data=st.data(), prompt=st.integers(0, 5000), completion=st.integers(0, 5000))
    def settle(self, data: st.DataObject, prompt: int, completion: int) -> None:
        if self.state.open:
            rid = data.draw(st.sampled_from(sorted(self.state.open)))
            self._apply(completed(rid, self.state.open[rid], prompt, completion))

    @rule(minutes=st.integers(0, 30))
    def time_passes_and_lost_reservations_expire(self, minutes: int) -> None:

        later = NOW + timedelta(minutes=minutes)
        for team in decider.expiring_teams(self.state, self.policy, later):
            for d in decider.expire(self.state, self.policy, later, team):
                self.state = decider.evolve(self.state, d)
        assert not decider.expiring_teams(self.state, self.policy, later)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.state.open:
            rid = data.draw(st.sampled_from(sorted(self.state.open)))
            self._apply(failed(rid, self.state.open[rid]))

    @invariant()
    def never_over_cap(self) -> None:
        for totals in self.state.ledgers.values():
            assert totals.reserved >= 0 and totals.spent + totals.reserved <= self.CAP
        held = sum(r.micros for r in self.state.open.values())
        assert held == sum(t.reserved for t in self.state.ledgers.values())


CapMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_cap_invariant_under_any_interleaving = CapMachine.TestCase


def test_decisions_are_deterministic() -> None:
    e = authorized("r1")
    assert decider.decide(e, decider.initial_state(), bundle(5000), NOW) == decider.decide(
        e, decider.initial_state(), bundle(5000), NOW)


@pytest.mark.parametrize("cap", [0, 1, 113])
def test_tiny_caps_reserve_nothing(cap: int) -> None:
    [event], _ = run([authorized("r")], decider.initial_state(), bundle(cap))
    assert isinstance(event, BudgetRejected)


def test_thresholds_are_announced_once_each_as_committed_money_grows() -> None:
    policy = bundle(1000, thresholds=(50, 80, 100))
    out, state = run([authorized(f"r{i}") for i in range(9)], decider.initial_state(), policy)
    crossed = [e.threshold_pct for e in out if isinstance(e, BudgetThresholdCrossed)]
    reserved = sum(e.amount_micros for e in out if isinstance(e, BudgetReserved))
    assert crossed == [p for p in (50, 80, 100) if reserved * 100 >= p * 1000]
    assert 50 in crossed and 80 in crossed
    again, _ = run([authorized("r-late")], state, policy)
    assert not any(isinstance(e, BudgetThresholdCrossed) for e in again)


def test_a_lost_reservation_expires_after_the_deadline_by_an_event() -> None:
    from datetime import timedelta

    policy = bundle(10_000, ttl_s=600)
    [reserved], state = run([authorized("lost")], decider.initial_state(), policy)
    assert decider.expire(state, policy, NOW + timedelta(seconds=599), "t") == []
    [released] = decider.expire(state, policy, NOW + timedelta(seconds=601), "t")
    assert isinstance(released, BudgetReleased) and released.reason == "expired"
    assert released.amount_micros == reserved.amount_micros and released.reserved_micros == 0  # type: ignore[attr-defined]
    state = decider.evolve(state, released)
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    late, _ = run([completed("lost", held, 1, 1)], state, policy)
    assert late == []  # a completion after expiry charges nothing twice and holds nothing


def test_an_authorization_seen_again_after_its_request_closed_reserves_nothing() -> None:
    """The known gap issue 9 names: a RequestAuthorized redelivered after its request settled, past
    the duplicate window, reserved a second time. A copy stored by abuse is the same case."""
    policy = bundle(10_000)
    [reserved], state = run([authorized("r1")], decider.initial_state(), policy)
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    _, settled = run([completed("r1", held, 10, 8)], state, policy)
    _, released = run([failed("r1", held)], state, policy)
    for closed in (settled, released):
        assert decider.decide(authorized("r1"), closed, policy, NOW + timedelta(hours=1)) == []
    later = NOW + decider.CLOSED_HORIZON + timedelta(minutes=1)
    [stale] = decider.decide(authorized("r2"), settled, policy, later)
    assert isinstance(stale, BudgetRejected) and stale.reason == "authorization_stale"


def test_an_authorization_seen_again_after_it_was_refused_reserves_nothing_even_once_it_fits() -> None:
    """A refused request is closed too: its caller was told no, so a redelivery after the duplicate
    window must not reserve (and run) it once the team has money again (a raised cap, a new period)."""
    [refused], state = run([authorized("r1", max_tokens=600)], decider.initial_state(), bundle(100))
    assert isinstance(refused, BudgetRejected) and "r1" in state.closed
    assert decider.decide(authorized("r1", max_tokens=600), state, bundle(10_000_000), NOW + timedelta(days=40)) == []


def test_the_memory_of_closed_requests_is_bounded_by_the_horizon() -> None:
    policy = bundle(10_000_000)
    state = decider.initial_state()
    for i, at in enumerate((NOW, NOW + timedelta(days=1), NOW + timedelta(days=3))):
        rid = f"r{i}"
        [reserved] = decider.decide(msgspec.structs.replace(authorized(rid), occurred_at=at), state, policy, at)
        state = decider.evolve(state, reserved)
        held = Reservation(team="t", period=reserved.period, micros=reserved.amount_micros)  # type: ignore[attr-defined]
        for d in decider.decide(completed(rid, held, 1, 1), state, policy, at):
            state = decider.evolve(state, d)
    assert "r0" in state.closed and "r2" in state.closed and len(state.closed) == 3  # all within the recent dict
    old = decider.Closed(generations=((NOW, remembered.Digests.of([remembered.digest("r0")])),
                                       (NOW + timedelta(days=1), remembered.Digests.of([remembered.digest("r1")]))))
    later = old.add("r2", NOW + timedelta(days=3))  # r0's generation closed more than two days before r2
    assert "r0" not in later and "r1" in later and "r2" in later


def test_closing_many_requests_seals_generations_instead_of_copying_them_all() -> None:
    """Folding one id copies at most the small recent dict; sealed generations merge like a binary
    counter, so 37 sealed generations' worth of ids sit in popcount(37) = 3 sets, every id kept."""
    closed = decider.Closed()
    total = remembered.GENERATION * 37 + 5
    for i in range(total):
        closed = closed.add(f"r{i}", NOW + timedelta(seconds=i))
    assert len(closed.recent) == 5 and len(closed) == total
    assert [len(ids) for _, ids in closed.generations] == [remembered.GENERATION * n for n in (32, 4, 1)]
    assert all(f"r{i}" in closed for i in range(total)) and "never" not in closed
    # sealed, an id costs its 16-byte digest and nothing more
    assert sum(len(ids.blob) for _, ids in closed.generations) == remembered.DIGEST_BYTES * (total - 5)
    newest = [at for at, _ in closed.generations]
    assert newest == sorted(newest)  # oldest first, each aged out by its newest id


def test_a_merged_generation_ages_out_whole_once_its_newest_id_is_past_the_horizon() -> None:
    closed = decider.Closed()
    for i in range(remembered.GENERATION * 2 + 1):
        closed = closed.add(f"r{i}", NOW)
    assert len(closed.generations) == 1
    later = closed.add("late", NOW + remembered.HORIZON + timedelta(seconds=1))
    assert "r0" not in later and "late" in later


def test_expiry_is_decided_from_the_clock_tick_event_at_its_time() -> None:
    """Timers are inputs (issue 9 item 1): a tick decides exactly what `expire` would, at the tick's time."""
    policy = bundle(10_000, ttl_s=60)
    [reserved], state = run([authorized("r1")], decider.initial_state(), policy)
    assert not decider.expiring_teams(state, policy, NOW + timedelta(seconds=30))
    later = NOW + timedelta(seconds=61)
    assert decider.expiring_teams(state, policy, later) == {"t"}
    tick = decider.tick("t", later, policy)
    released = decider.decide(tick, state, policy, later + timedelta(hours=5))  # `now` of the shell is ignored
    assert released == decider.expire(state, policy, later, "t") and isinstance(released[0], BudgetReleased)
    assert released[0].occurred_at == later and released[0].reason == "expired"
    state = decider.evolve(state, released[0])
    assert decider.decide(tick, state, policy, later) == []  # a second tick, or a redelivery, decides nothing


def test_a_request_still_open_past_its_deadline_is_ended_by_the_budgets_clock() -> None:
    """No invoker took its route (or one died with it): the money goes back and the caller hears
    `timeout`, decided from a tick so replay re-makes it; nothing happens before deadline + grace."""
    from datetime import timedelta

    policy = bundle(10_000)
    auth = msgspec.structs.replace(authorized("stuck"), deadline_at=NOW + timedelta(seconds=2),
                                   reply_to="_INBOX_app.tester.r1")
    [reserved], state = run([auth], decider.initial_state(), policy)
    assert decider.expiring_teams(state, policy, NOW + timedelta(seconds=6)) == set()
    assert decider.expire(state, policy, NOW + timedelta(seconds=6), "t") == []
    assert decider.expiring_teams(state, policy, NOW + timedelta(seconds=7)) == {"t"}
    tick = decider.tick("t", NOW + timedelta(seconds=7), policy)
    released, failed_ = decider.decide(tick, state, policy, NOW + timedelta(seconds=30))  # the tick is the clock
    assert isinstance(released, BudgetReleased) and released.reason == "deadline"
    assert released.amount_micros == reserved.amount_micros and released.occurred_at == tick.occurred_at  # type: ignore[attr-defined]
    assert isinstance(failed_, RequestFailed) and (failed_.reason, failed_.reply_to) == ("timeout", auth.reply_to)
    state = decider.evolve(decider.evolve(state, released), failed_)
    assert state.due == {} and state.open == {}
    assert decider.decide(failed_, state, policy, NOW) == []  # its own RequestFailed releases nothing twice
    assert decider.decide(tick, state, policy, NOW) == []  # a redelivered tick decides nothing again


def test_a_negative_token_count_never_credits_the_ledger() -> None:
    """Found by a hostile review: usage below zero settled as a credit (invokers now refuse it too)."""
    policy = bundle(10_000)
    [reserved], state = run([authorized("neg")], decider.initial_state(), policy)
    held = Reservation(team="t", period="2026-11", micros=reserved.amount_micros)  # type: ignore[attr-defined]
    [settled], _ = run([completed("neg", held, 10, -1_000_000)], state, policy)
    assert isinstance(settled, BudgetSettled) and settled.charged_micros == 0 and settled.spent_micros >= 0


def test_a_snapshot_of_digests_cut_short_or_out_of_order_is_refused_so_the_ledger_is_replayed() -> None:
    """Found by a hostile review: an unsorted blob silently forgot ids (a closed request reserved
    again); a blob of a length no digest has was taken as is."""
    closed = decider.Closed()
    for i in range(remembered.GENERATION + 1):
        closed = closed.add(f"r{i}", NOW)
    blob = closed.generations[0][1].blob
    good = msgspec.json.encode(closed)
    assert msgspec.json.decode(good, type=decider.Closed) == closed
    for bad in (blob[:-1], blob[16:32] + blob[:16] + blob[32:]):
        forged = good.replace(msgspec.json.encode(blob)[1:-1], msgspec.json.encode(bad)[1:-1])
        assert forged != good
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(forged, type=decider.Closed)
