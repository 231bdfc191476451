"""Issue 12 item 1, the pure part: which counters a request takes, what refuses it, what is given
back, what the bundle accepts, and that an old bundle has no limits. The counting itself races on
a real broker in tests/test_budget_race.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from enclave_gateway.schemas import subjects
from enclave_gateway.schemas.events import BudgetRejected, BudgetReserved, BudgetSettled, RateCount
from enclave_gateway.schemas.policy import Admission, RateLimit
from enclave_gateway.services.budget import decider, rates
from enclave_gateway.services.policy import PolicyError, bundle_from_files, read_files
from enclave_gateway.services.policy.bundle import digest

from .test_budget_decider import authorized, bundle, completed

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 12, 0, 42, tzinfo=UTC)


def limited(**scopes: dict[str, RateLimit]) -> object:
    return msgspec.structs.replace(bundle(10**9), admission=Admission(**scopes))  # type: ignore[arg-type]


def test_a_request_takes_the_counts_of_every_limit_that_names_it_in_order() -> None:
    policy = limited(team={"t": RateLimit(requests_per_minute=5, tokens_per_minute=500)},
                     application={"s": RateLimit(requests_per_minute=2)},
                     model={"enclave-tiny": RateLimit(tokens_per_minute=900), "other": RateLimit(requests_per_minute=1)})
    event = authorized("r1")
    todo = rates.to_count(event, policy, NOW, decider.token_bound(event, policy))  # type: ignore[arg-type]
    assert [(c.scope, c.key, c.kind, c.limit) for c in todo] == [
        ("team", "t", "requests", 5), ("team", "t", "tokens", 500), ("application", "s", "requests", 2),
        ("model", "enclave-tiny", "tokens", 900)]
    assert {c.window for c in todo} == {"2026-11-25T12:00"}
    assert [c.counted for c in todo if c.kind == "tokens"] == [decider.token_bound(event, policy)] * 2  # type: ignore[arg-type]


def test_no_admission_file_means_no_limits() -> None:
    event = authorized("r1")
    assert rates.to_count(event, bundle(10**9), NOW, 100) == ()


def _counted(observed: int, limit: int, kind: str = "requests", counted: int = 1) -> RateCount:
    return RateCount(scope="team", key="t", kind=kind, window="2026-11-25T12:00", counted=counted,  # type: ignore[arg-type]
                     observed=observed, limit=limit)


def test_a_count_over_its_limit_refuses_with_retry_after_the_minute() -> None:
    policy = limited(team={"t": RateLimit(requests_per_minute=3)})
    [refused] = decider.decide(authorized("r1"), decider.initial_state(), policy, NOW, (_counted(4, 3),))  # type: ignore[arg-type]
    assert isinstance(refused, BudgetRejected) and refused.reason == "rate_limited"
    assert refused.retry_after_s == 18 and refused.rates == (_counted(4, 3),)
    state = decider.evolve(decider.initial_state(), refused)
    assert decider.decide(authorized("r1"), state, policy, NOW, (_counted(1, 3),)) == []  # closed: never again


def test_a_request_over_a_limit_on_its_own_is_refused_without_a_retry_after() -> None:
    policy = limited(team={"t": RateLimit(tokens_per_minute=10)})
    [refused] = decider.decide(authorized("r1"), decider.initial_state(), policy, NOW,  # type: ignore[arg-type]
                               (_counted(40, 10, "tokens", counted=40),))
    assert isinstance(refused, BudgetRejected) and refused.reason == "rate_limited" and refused.retry_after_s is None
    from enclave_gateway.services.edge import decider as edge

    error = edge.reply_for(refused).error
    assert error is not None and error.retry_after_s is None and "fewer max_tokens" in error.message


def test_the_last_slot_is_admitted_and_recorded_with_the_reservation() -> None:
    policy = limited(team={"t": RateLimit(requests_per_minute=3)})
    [reserved] = decider.decide(authorized("r1"), decider.initial_state(), policy, NOW, (_counted(3, 3),))  # type: ignore[arg-type]
    assert isinstance(reserved, BudgetReserved) and reserved.rates == (_counted(3, 3),)
    state = decider.evolve(decider.initial_state(), reserved)
    assert state.rates == {"r1": (_counted(3, 3),)}
    held = state.open["r1"]
    [settled, *_] = decider.decide(completed("r1", held, 5, 2), state, policy, NOW)  # type: ignore[arg-type]
    assert isinstance(settled, BudgetSettled) and decider.evolve(state, settled).rates == {}


def test_a_rate_limit_is_checked_before_money_and_a_money_refusal_records_the_counts_too() -> None:
    poor = msgspec.structs.replace(limited(team={"t": RateLimit(requests_per_minute=3)}),  # type: ignore[type-var]
                                   budgets=bundle(1).budgets)
    [refused] = decider.decide(authorized("r1"), decider.initial_state(), poor, NOW, (_counted(2, 3),))
    assert isinstance(refused, BudgetRejected) and refused.reason == "budget_exceeded"
    assert refused.rates == (_counted(2, 3),) and refused.retry_after_s is None


def test_what_is_given_back() -> None:
    tokens = _counted(700, 900, "tokens", counted=300)
    requests = _counted(3, 5)
    subject = subjects.rate_counter("2026-11-25T12:00", "team", "t", "tokens")
    assert rates.give_back((requests, tokens), 120, NOW) == [(subject, -180)]  # settled: the unused tokens
    assert rates.give_back((requests, tokens), 999, NOW) == []  # used more than its bound: nothing to give
    assert rates.give_back((requests, tokens), -50, NOW) == [(subject, -300)]  # a negative usage gives no more
    assert rates.give_back((tokens,), 0, NOW + timedelta(minutes=1)) == []  # its minute is over: left alone
    refused = rates.give_back_refused((requests, tokens), NOW)
    assert refused == [(subjects.rate_counter("2026-11-25T12:00", "team", "t", "requests"), -1), (subject, -300)]


def test_retry_after_is_the_rest_of_the_minute() -> None:
    assert rates.retry_after_s(NOW) == 18
    assert rates.retry_after_s(NOW.replace(second=59, microsecond=999_000)) == 1
    assert rates.retry_after_s(NOW.replace(second=0, microsecond=0)) == 60


def test_two_keys_never_share_a_counter() -> None:
    a = subjects.rate_counter("2026-11-25T12:00", "application", "svc.a", "requests")
    b = subjects.rate_counter("2026-11-25T12:00", "application", "svc_a", "requests")
    assert a != b and a.startswith("gw.rate.20261125T1200.application.svc_a-") and "*" not in a


@pytest.mark.parametrize("text, error", [
    ('[team.nobody]\nrequests_per_minute = 5\n', "teams with no budget"),
    ('[model.nothing]\nrequests_per_minute = 5\n', "no catalog model"),
    ('[team.alpha]\nrequests_per_minute = 0\n', r"1 to 10\^9"),
    ('[application."a b"]\nrequests_per_minute = 1\n', "token subject"),
    ('[content_marking]\nmode = "loud"\n', "admission.toml"),
    ('[team.alpha]\nrequests_per_hour = 5\n', "admission.toml"),
])
def test_an_invalid_admission_file_is_refused_by_name(text: str, error: str) -> None:
    files = {**read_files(ROOT / "policies"), "admission.toml": text}
    with pytest.raises(PolicyError, match=error):
        bundle_from_files(files)


def test_a_bundle_without_the_optional_file_keeps_the_digest_it_was_signed_with() -> None:
    files = read_files(ROOT / "policies")
    without = {k: v for k, v in files.items() if k != "admission.toml"}
    assert "admission.toml" in files and bundle_from_files(without).admission is None
    assert digest(without) != digest(files)
    # the digest of a bundle of the five files is what it was before admission.toml existed
    import hashlib

    h = hashlib.sha256()
    for name in ("catalog.toml", "budgets.toml", "access_model.conf", "access_policy.csv", "issuers.jwks.json"):
        h.update(name.encode() + b"\0" + without[name].encode() + b"\0")
    assert digest(without) == h.hexdigest()


def test_removing_or_adding_the_admission_file_breaks_the_signature() -> None:
    """The guard and the limits cannot be stripped from a signed bundle, nor slipped into one."""
    from enclave_gateway.services import keys
    from enclave_gateway.services.policy.signing import sign_digest, verify
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    trusted = {keys.public_of(private).kid: keys.public_of(private).public_key}
    files = read_files(ROOT / "policies")
    without = {k: v for k, v in files.items() if k != "admission.toml"}
    for signed, presented in ((files, without), (without, files)):
        sig = sign_digest(private, digest(signed), datetime.now(UTC))
        verify(signed, sig.sha256, sig.kid, sig.signature, sig.signed_at, trusted)  # type: ignore[arg-type]
        with pytest.raises(PolicyError, match="does not match"):
            verify(presented, sig.sha256, sig.kid, sig.signature, sig.signed_at, trusted)  # type: ignore[arg-type]
