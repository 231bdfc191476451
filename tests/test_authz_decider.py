"""Authz as a pure function: token defects, the classification lattice, team/model rules.

The ABAC table runs against its own catalog (models accredited at U, S//SI//NOFORN and
TS//SI/TK//NOFORN) and the shipped casbin model and lattice rules.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from enclave_gateway import issuer
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import RequestAuthorized, RequestDenied, RequestSubmitted
from enclave_gateway.schemas.labels import Label, dominates, parse_label
from enclave_gateway.services.authz import decider
from enclave_gateway.services.authz.access import AccessRules
from enclave_gateway.services.authz.tokens import keyring
from enclave_gateway.services.policy import bundle_from_files, read_files
from enclave_gateway.services.settings import jwks_path
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
NOW = int(time.time())
CATALOG = """
[[model]]
id = "u-model"
endpoint = "e"
context_length = 512
default_max_tokens = 8
prompt_micros_per_1k = 1
completion_micros_per_1k = 1

[[model]]
id = "s-model"
endpoint = "e"
context_length = 512
default_max_tokens = 8
prompt_micros_per_1k = 1
completion_micros_per_1k = 1
accreditation = "SECRET//SI//NOFORN"
aliases = ["secret-chat"]

[[model]]
id = "s-model-old"
endpoint = "e"
context_length = 512
default_max_tokens = 8
prompt_micros_per_1k = 1
completion_micros_per_1k = 1
status = "deprecated"
replacement = "s-model"

[[model]]
id = "ts-model"
endpoint = "e"
context_length = 512
default_max_tokens = 8
prompt_micros_per_1k = 1
completion_micros_per_1k = 1
accreditation = "TOP SECRET//SI/TK//NOFORN"
"""
ACCESS = """p2, clearance-dominates-input, m2
p2, accreditation-dominates-input, m3
p2, no-write-down, m4
p, team:alpha, *
p, team:bravo, u-model
p, role:analyst, s-model
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    issuer.ensure_keys(folder)
    return folder


@pytest.fixture(scope="module")
def policy(keys: Path) -> decider.AuthzPolicy:
    files = {**read_files(ROOT / "policies"), "catalog.toml": CATALOG, "access_policy.csv": ACCESS}
    bundle = bundle_from_files(files)
    return decider.AuthzPolicy(bundle=bundle, rules=AccessRules(bundle),
                               keys=keyring([jwks_path(keys).read_text()]))


def submitted(token: str, model: str, input_label: str | None = None,
              output_label: str | None = None) -> RequestSubmitted:
    return RequestSubmitted(event_id="r:submit", request_id="r", occurred_at=datetime.fromtimestamp(NOW, UTC),
                            policy_version="p", entry="nats", token=token, reply_to="inbox",
                            chat=ChatBody(model=model, messages=(ChatMessage(role="user", content="x"),)),
                            input_label=input_label, output_label=output_label)


def decide(policy: decider.AuthzPolicy, token: str, model: str = "u-model", at: int = NOW,
           input_label: str | None = None, output_label: str | None = None) -> RequestAuthorized | RequestDenied:
    [event] = decider.decide(submitted(token, model, input_label, output_label), decider.initial_state(), policy,
                             datetime.fromtimestamp(at, UTC))
    assert isinstance(event, RequestAuthorized | RequestDenied)
    return event


def session(keys: Path, clearance: str = "UNCLASSIFIED", comps: tuple[str, ...] = (), caveats: tuple[str, ...] = (),
            team: str = "alpha", roles: tuple[str, ...] = ()) -> str:
    return issuer.issue(keys, subject="s", team=team, roles=roles, now=NOW, clearance=clearance,
                        compartments=comps, caveats=caveats)


S_SI_NF = ("SECRET", ("SI",), ("NOFORN",))
ABAC = [
    # (case id, (clearance, compartments, caveats), team, roles, model, input, output, expected rule or None)
    ("u-session-no-labels", ("UNCLASSIFIED", (), ()), "alpha", (), "u-model", None, None, None),
    ("u-input-on-secret-model", ("UNCLASSIFIED", (), ()), "alpha", (), "s-model", "U", "U", None),
    ("cleared-session-declares-nothing", S_SI_NF, "alpha", (), "s-model", None, None, "no-write-down"),
    ("secret-in-secret-out", S_SI_NF, "alpha", (), "s-model", "SECRET", "SECRET", None),
    ("secret-in-unclassified-out", S_SI_NF, "alpha", (), "s-model", "SECRET", "UNCLASSIFIED", "no-write-down"),
    ("secret-on-unaccredited-model", S_SI_NF, "alpha", (), "u-model", "SECRET", "SECRET", "accreditation-dominates-input"),
    ("confidential-clearance-secret-input", ("CONFIDENTIAL", (), ()), "alpha", (), "s-model", "SECRET", "SECRET",
     "clearance-dominates-input"),
    ("compartment-held", S_SI_NF, "alpha", (), "s-model", "SECRET//SI", "SECRET//SI", None),
    ("compartment-not-held", ("SECRET", (), ()), "alpha", (), "s-model", "SECRET//SI", "SECRET//SI",
     "clearance-dominates-input"),
    ("output-lacks-compartment", S_SI_NF, "alpha", (), "s-model", "SECRET//SI", "SECRET", "no-write-down"),
    ("ts-input-on-secret-model", ("TOP SECRET", ("SI", "TK"), ("NOFORN",)), "alpha", (), "s-model",
     "TOP SECRET//SI/TK", "TOP SECRET//SI/TK", "accreditation-dominates-input"),
    ("ts-input-on-ts-model", ("TOP SECRET", ("SI", "TK"), ("NOFORN",)), "alpha", (), "ts-model",
     "TOP SECRET//SI/TK", "TOP SECRET//SI/TK", None),
    ("tk-not-accredited-on-secret-model", ("TOP SECRET", ("SI", "TK"), ()), "alpha", (), "s-model", "SECRET//TK",
     "SECRET//TK", "accreditation-dominates-input"),
    ("noforn-eligible", ("SECRET", (), ("NOFORN",)), "alpha", (), "s-model", "SECRET//NOFORN", "SECRET//NOFORN",
     None),
    ("noforn-not-eligible", ("SECRET", (), ()), "alpha", (), "s-model", "SECRET//NOFORN", "SECRET//NOFORN",
     "clearance-dominates-input"),
    ("noforn-to-releasable-channel", ("SECRET", (), ("NOFORN",)), "alpha", (), "s-model", "SECRET//NOFORN",
     "SECRET", "no-write-down"),
    ("team-not-allowed-model", S_SI_NF, "bravo", (), "s-model", "SECRET", "SECRET", "team-model-access"),
    ("role-grants-model", S_SI_NF, "bravo", ("analyst",), "s-model", "SECRET", "SECRET", None),
    ("role-does-not-grant-other-model", S_SI_NF, "bravo", ("analyst",), "ts-model", "SECRET", "SECRET",
     "team-model-access"),
    ("team-rule-before-lattice", ("UNCLASSIFIED", (), ()), "bravo", (), "s-model", "SECRET", "U",
     "team-model-access"),
    ("unknown-model", S_SI_NF, "alpha", (), "gpt-9", "SECRET", "SECRET", "catalog"),
    ("bad-level", S_SI_NF, "alpha", (), "s-model", "SEKRET", "SECRET", "label-syntax"),
    ("bad-control", S_SI_NF, "alpha", (), "s-model", "SECRET//S!", "SECRET", "label-syntax"),
    ("empty-output-is-undeclared", S_SI_NF, "alpha", (), "s-model", "SECRET", "", "no-write-down"),  # -> U
    ("lowercase-marking", S_SI_NF, "alpha", (), "s-model", "secret//si", "secret//si", None),
    ("abbreviated-marking", S_SI_NF, "alpha", (), "s-model", "S//SI", "TS//SI", None),
    ("write-up-is-fine", S_SI_NF, "alpha", (), "s-model", "U", "TOP SECRET", None),
    ("cui-write-down", ("CUI", (), ()), "alpha", (), "s-model", "CUI", "U", "no-write-down"),
    ("cui-on-unaccredited-model", ("CUI", (), ()), "alpha", (), "u-model", "CUI", "CUI",
     "accreditation-dominates-input"),
    ("output-declared-input-defaults-to-clearance", ("SECRET", (), ()), "alpha", (), "s-model", None, "SECRET", None),
    ("ts-session-declares-unclassified-input", ("TOP SECRET", (), ()), "alpha", (), "u-model", "U", "U", None),
    ("alias-resolves-to-accredited-model", S_SI_NF, "alpha", (), "secret-chat", "SECRET//SI", "SECRET//SI", None),
    ("deprecated-name-uses-replacements-accreditation", S_SI_NF, "alpha", (), "s-model-old", "SECRET", "SECRET",
     None),
    ("input-default-blocks-unaccredited-model", S_SI_NF, "alpha", (), "u-model", None, "TOP SECRET//SI//NOFORN",
     "accreditation-dominates-input"),
]


@pytest.mark.parametrize("case", ABAC, ids=[c[0] for c in ABAC])
def test_abac_table(policy: decider.AuthzPolicy, keys: Path, case: tuple) -> None:  # type: ignore[type-arg]
    _, (level, comps, caveats), team, roles, model, inp, out, rule = case
    token = session(keys, level, comps, caveats, team, roles)
    event = decide(policy, token, model, input_label=inp, output_label=out)
    if rule is None:
        assert isinstance(event, RequestAuthorized), getattr(event, "detail", "")
        assert event.input_label and event.output_label
    else:
        assert isinstance(event, RequestDenied)
        assert event.rule == rule, event.detail
        assert event.reason and event.detail


def test_abac_table_is_large_enough() -> None:
    assert len(ABAC) >= 30
    assert {c[-1] for c in ABAC} >= {None, "no-write-down", "clearance-dominates-input",
                                     "accreditation-dominates-input", "team-model-access", "catalog", "label-syntax"}


def test_denials_record_labels_and_the_caller(policy: decider.AuthzPolicy, keys: Path) -> None:
    event = decide(policy, session(keys, *S_SI_NF), "s-model", input_label="SECRET//SI", output_label="U")
    assert isinstance(event, RequestDenied) and event.reason == "write_down"
    assert (event.input_label, event.output_label) == ("SECRET//SI", "UNCLASSIFIED")
    assert event.caller is not None and event.caller.clearance == "SECRET//NOFORN/SI"


LEVELS = ["UNCLASSIFIED", "CUI", "CONFIDENTIAL", "SECRET", "TOP SECRET"]
controls = st.frozensets(st.sampled_from(["SI", "TK", "NOFORN"]))


def marking(level: int, ctl: frozenset[str]) -> str:
    return LEVELS[level] + (("//" + "/".join(sorted(ctl))) if ctl else "")


@settings(max_examples=300, deadline=None)
@given(clr=st.integers(0, 4), clr_ctl=controls, inp=st.integers(0, 4), inp_ctl=controls, out=st.integers(0, 4),
       out_ctl=controls, model=st.sampled_from(["u-model", "s-model", "ts-model"]))
def test_authorized_only_when_every_lattice_rule_holds(policy: decider.AuthzPolicy, keys: Path, clr: int,
                                                       clr_ctl: frozenset[str], inp: int, inp_ctl: frozenset[str],
                                                       out: int, out_ctl: frozenset[str], model: str) -> None:
    token = session(keys, LEVELS[clr], tuple(sorted(clr_ctl)))
    event = decide(policy, token, model, input_label=marking(inp, inp_ctl), output_label=marking(out, out_ctl))
    clearance, i, o = Label(level=clr, controls=clr_ctl), Label(level=inp, controls=inp_ctl), \
        Label(level=out, controls=out_ctl)
    entry = next(m for m in policy.bundle.catalog.model if m.id == model)
    holds = dominates(clearance, i) and dominates(parse_label(entry.accreditation), i) and dominates(o, i)
    assert isinstance(event, RequestAuthorized) == holds  # never allowed otherwise, never refused needlessly


@settings(max_examples=50, deadline=None)
@given(team=st.sampled_from(["alpha", "bravo", "nobody"]), model=st.sampled_from(
    ["u-model", "secret-chat", "s-model-old", "ts-model", "nope"]), offset=st.integers(-100, 7200))
def test_decisions_are_deterministic(policy: decider.AuthzPolicy, keys: Path, team: str, model: str,
                                     offset: int) -> None:
    token = session(keys, "SECRET", team=team)
    assert decide(policy, token, model, NOW + offset) == decide(policy, token, model, NOW + offset)


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _token_cases(keys: Path) -> dict[str, tuple[str, int]]:
    kid = issuer.ensure_keys(keys)
    good = session(keys)
    head, payload, sig = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    other = Ed25519PrivateKey.generate()
    own = issuer._private_key(keys)
    return {
        "token_missing": ("", NOW),
        "token_malformed": ("not-a-jwt", NOW),
        "token_malformed_clearance": (jwt.encode({**claims, "clearance": "SEKRET"}, own, algorithm="EdDSA",
                                                 headers={"kid": kid}), NOW),
        "token_bad_algorithm": (f"{_b64({'alg': 'none', 'kid': kid})}.{payload}.", NOW),
        "token_bad_algorithm_hs256": (jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": kid}), NOW),
        "token_unknown_key": (jwt.encode(claims, other, algorithm="EdDSA", headers={"kid": "nope"}), NOW),
        "token_bad_signature": (jwt.encode(claims, other, algorithm="EdDSA", headers={"kid": kid}), NOW),
        "token_bad_signature_tampered": (f"{head}.{_b64({**claims, 'clearance': 'TOP SECRET'})}.{sig}", NOW),
        "token_expired": (good, NOW + 3600 + 31),
        "token_not_yet_valid": (good, NOW - 31),
        "token_missing_claim": (jwt.encode({k: v for k, v in claims.items() if k != "jti"}, own, algorithm="EdDSA",
                                           headers={"kid": kid}), NOW),
        "token_missing_claim_clearance": (jwt.encode({k: v for k, v in claims.items() if k != "clearance"}, own,
                                                     algorithm="EdDSA", headers={"kid": kid}), NOW),
    }


@pytest.mark.parametrize("case", ["token_missing", "token_malformed", "token_malformed_clearance",
                                  "token_bad_algorithm", "token_bad_algorithm_hs256", "token_unknown_key",
                                  "token_bad_signature", "token_bad_signature_tampered", "token_expired",
                                  "token_not_yet_valid", "token_missing_claim", "token_missing_claim_clearance"])
def test_each_token_defect_is_denied_with_its_own_reason(policy: decider.AuthzPolicy, keys: Path, case: str) -> None:
    token, at = _token_cases(keys)[case]
    event = decide(policy, token, at=at)
    assert isinstance(event, RequestDenied)
    assert event.rule == "session-token"
    expected = case
    for suffix in ("_hs256", "_tampered", "_clearance"):
        expected = expected.removesuffix(suffix)
    assert event.reason == expected


def test_leeway_accepts_a_token_just_past_expiry(policy: decider.AuthzPolicy, keys: Path) -> None:
    token = issuer.issue(keys, subject="a", team="alpha", now=NOW, ttl_s=60)
    assert isinstance(decide(policy, token, at=NOW + 60 + 29), RequestAuthorized)
    assert isinstance(decide(policy, token, at=NOW + 60 + 31), RequestDenied)


def test_keys_rotate_by_kid(policy: decider.AuthzPolicy, keys: Path, tmp_path: Path) -> None:
    """Two issuer keys in the ring: tokens of either verify, each by its own kid."""
    issuer.ensure_keys(tmp_path)
    both = msgspec.structs.replace(policy, keys=keyring([jwks_path(keys).read_text(), jwks_path(tmp_path).read_text()]))
    for folder in (keys, tmp_path):
        assert isinstance(decide(both, issuer.issue(folder, subject="a", team="alpha", now=NOW)), RequestAuthorized)
    old_only = decide(policy, issuer.issue(tmp_path, subject="a", team="alpha", now=NOW))
    assert isinstance(old_only, RequestDenied) and old_only.reason == "token_unknown_key"


def test_the_token_cache_never_changes_a_decision(policy: decider.AuthzPolicy, keys: Path) -> None:
    from enclave_gateway.services.authz.tokens import TokenCache

    cached = msgspec.structs.replace(policy, tokens=TokenCache(max_entries=8))
    for _, (level, comps, caveats), team, roles, model, inp, out, _rule in ABAC:
        token = session(keys, level, comps, caveats, team, roles)
        for _ in range(2):  # the second call is a cache hit
            assert decide(cached, token, model, input_label=inp, output_label=out) == decide(
                policy, token, model, input_label=inp, output_label=out)
    assert 0 < len(cached.tokens or ()) <= 8  # bounded
    for case, (token, at) in _token_cases(keys).items():
        assert decide(cached, token, at=at) == decide(policy, token, at=at), case


def test_a_cached_token_still_expires(policy: decider.AuthzPolicy, keys: Path) -> None:
    from enclave_gateway.services.authz.tokens import TokenCache

    cached = msgspec.structs.replace(policy, tokens=TokenCache())
    token = issuer.issue(keys, subject="a", team="alpha", now=NOW, ttl_s=60)
    assert isinstance(decide(cached, token), RequestAuthorized)
    late = decide(cached, token, at=NOW + 3600)
    assert isinstance(late, RequestDenied) and late.reason == "token_expired"


def test_the_memo_of_access_decisions_never_changes_one(policy: decider.AuthzPolicy) -> None:
    """first_denial remembers answers per compiled policy; each must equal casbin's own, fresh."""
    from enclave_gateway.schemas.labels import parse_label

    rules = policy.rules
    cases = [(("team:alpha",), "enclave-tiny"), (("team:alpha",), "analyst-large"), (("team:nobody",), "u-model")]
    for principals, model in cases:
        for labels in (("SECRET", "SECRET"), ("SECRET", "UNCLASSIFIED"), ("UNCLASSIFIED", "UNCLASSIFIED")):
            args = (principals, parse_label("SECRET"), model, parse_label("SECRET"), *map(parse_label, labels))
            first, again = rules.first_denial(*args), rules.first_denial(*args)
            assert first == again == rules._first_denial(*args)[0]


@settings(max_examples=40, deadline=None)
@given(team=st.sampled_from(["alpha", "bravo", "nobody"]), model=st.sampled_from(["u-model", "s-model", "x"]),
       token_kind=st.sampled_from(["good", "garbage", "missing"]))
def test_once_its_decision_is_folded_in_the_same_request_decides_nothing(policy: decider.AuthzPolicy, keys: Path,
                                                                         team: str, model: str,
                                                                         token_kind: str) -> None:
    """The equinox property (issue 9 item 2), for allows and denials alike."""
    token = {"good": issuer.issue(keys, subject="s", team=team, now=NOW), "garbage": "x.y.z", "missing": ""}[token_kind]
    cmd = submitted(token, model)
    at = datetime.fromtimestamp(NOW, UTC)
    state = decider.initial_state()
    decided = decider.decide(cmd, state, policy, at)
    assert len(decided) == 1
    for event in decided:
        state = decider.evolve(state, event)
    assert decider.decide(cmd, state, policy, at) == []
    assert decider.decide(msgspec.structs.replace(cmd, request_id="other", event_id="other:submit"), state, policy,
                          at) != []  # only that request
