"""Authz as a pure function: token defects, catalog, team/model rules, determinism."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_gateway import issuer
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import RequestAuthorized, RequestDenied, RequestSubmitted
from enclave_gateway.services.authz import decider
from enclave_gateway.services.authz.access import AccessRules
from enclave_gateway.services.policy_store import load_bundle
from enclave_gateway.services.settings import load_keys

ROOT = Path(__file__).resolve().parent.parent
NOW = int(time.time())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    issuer.ensure_keys(folder)
    return folder


@pytest.fixture(scope="module")
def policy(keys: Path) -> decider.AuthzPolicy:
    bundle = load_bundle(ROOT / "policies")
    return decider.AuthzPolicy(bundle=bundle, rules=AccessRules(bundle), keys=load_keys(keys))


def submitted(token: str, model: str = "enclave-tiny") -> RequestSubmitted:
    return RequestSubmitted(event_id="r:submit", request_id="r", occurred_at=datetime.fromtimestamp(NOW, UTC),
                            policy_version="p", entry="nats", token=token, reply_to="inbox",
                            chat=ChatBody(model=model, messages=(ChatMessage(role="user", content="x"),)))


def decide(policy: decider.AuthzPolicy, token: str, model: str = "enclave-tiny", at: int = NOW):  # type: ignore[no-untyped-def]
    [event] = decider.decide(submitted(token, model), decider.initial_state(), policy,
                             datetime.fromtimestamp(at, UTC))
    return event


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _kid(keys: Path) -> str:
    return issuer.ensure_keys(keys)


def test_valid_token_for_allowed_model_is_authorized_with_the_resolved_id(policy, keys: Path) -> None:
    event = decide(policy, issuer.issue(keys, subject="alice", team="alpha", now=NOW), model="tiny")
    assert isinstance(event, RequestAuthorized)
    assert event.model_id == "enclave-tiny" and event.caller.team == "alpha" and event.caller.subject == "alice"
    assert event.policy_version == policy.bundle.version and event.event_id == "r:authz"


def test_role_grants_access_beyond_the_team(policy, keys: Path) -> None:
    denied = decide(policy, issuer.issue(keys, subject="b", team="bravo", now=NOW), model="analyst-large")
    allowed = decide(policy, issuer.issue(keys, subject="b", team="bravo", roles=("admin",), now=NOW),
                     model="analyst-large")
    assert isinstance(denied, RequestDenied) and denied.rule == "team-model-access"
    assert isinstance(allowed, RequestAuthorized)


def test_unknown_model_is_denied_by_the_catalog_rule(policy, keys: Path) -> None:
    event = decide(policy, issuer.issue(keys, subject="a", team="alpha", now=NOW), model="gpt-9")
    assert isinstance(event, RequestDenied) and (event.reason, event.rule) == ("model_not_found", "catalog")


def _token_cases(keys: Path) -> dict[str, tuple[str, int]]:
    kid = _kid(keys)
    good = issuer.issue(keys, subject="a", team="alpha", now=NOW)
    head, payload, sig = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    other = Ed25519PrivateKey.generate()
    no_jti = {k: v for k, v in claims.items() if k != "jti"}
    return {
        "token_missing": ("", NOW),
        "token_malformed": ("not-a-jwt", NOW),
        "token_bad_algorithm": (f"{_b64({'alg': 'none', 'kid': kid})}.{payload}.", NOW),
        "token_bad_algorithm_hs256": (jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": kid}), NOW),
        "token_unknown_key": (jwt.encode(claims, other, algorithm="EdDSA", headers={"kid": "nope"}), NOW),
        "token_bad_signature": (jwt.encode(claims, other, algorithm="EdDSA", headers={"kid": kid}), NOW),
        "token_bad_signature_tampered": (f"{head}.{_b64({**claims, 'team': 'bravo'})}.{sig}", NOW),
        "token_expired": (good, NOW + 3600 + 31),
        "token_not_yet_valid": (good, NOW - 31),
        "token_missing_claim": (jwt.encode(no_jti, issuer._private_key(keys), algorithm="EdDSA",
                                           headers={"kid": kid}), NOW),
    }


@pytest.mark.parametrize("case", ["token_missing", "token_malformed", "token_bad_algorithm",
                                  "token_bad_algorithm_hs256", "token_unknown_key", "token_bad_signature",
                                  "token_bad_signature_tampered", "token_expired", "token_not_yet_valid",
                                  "token_missing_claim"])
def test_each_token_defect_is_denied_with_its_own_reason(policy, keys: Path, case: str) -> None:
    token, at = _token_cases(keys)[case]
    event = decide(policy, token, at=at)
    assert isinstance(event, RequestDenied)
    assert event.rule == "session-token"
    assert event.reason == case.removesuffix("_hs256").removesuffix("_tampered")


def test_leeway_accepts_a_token_just_past_expiry(policy, keys: Path) -> None:
    token = issuer.issue(keys, subject="a", team="alpha", now=NOW, ttl_s=60)
    assert isinstance(decide(policy, token, at=NOW + 60 + 29), RequestAuthorized)
    assert isinstance(decide(policy, token, at=NOW + 60 + 31), RequestDenied)


@settings(max_examples=50, deadline=None)
@given(team=st.sampled_from(["alpha", "bravo", "nobody"]), model=st.sampled_from(
    ["enclave-tiny", "tiny", "enclave-tiny-v0", "analyst-large", "nope"]), offset=st.integers(-100, 7200))
def test_decisions_are_deterministic_and_name_a_rule_when_denied(policy, keys: Path, team: str, model: str,
                                                                 offset: int) -> None:
    token = issuer.issue(keys, subject="p", team=team, now=NOW)
    first, second = decide(policy, token, model, NOW + offset), decide(policy, token, model, NOW + offset)
    assert first == second
    if isinstance(first, RequestDenied):
        assert first.rule in {"session-token", "catalog", "team-model-access"} and first.reason
