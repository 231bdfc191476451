"""Issue 12 item 2: the content-marking guard. Markings in the prompt's own text raise the input
label before the lattice rules decide; a denial names rule `content-marking` and where the marking
stands, never the text around it; the guard never lowers a label."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from enclave_gateway.schemas.commands import ChatBody, ChatMessage
from enclave_gateway.schemas.events import RequestAuthorized, RequestDenied, RequestSubmitted
from enclave_gateway.schemas.labels import LEVELS, Label, dominates, format_label, parse_label
from enclave_gateway.schemas.policy import Admission, ContentMarkingGuard
from enclave_gateway.services.authz import decider, markings
from enclave_gateway.services.authz.access import AccessRules
from enclave_gateway.services.authz.tokens import keyring
from enclave_gateway.services.policy import bundle_from_files, read_files
from enclave_gateway.services.settings import jwks_path
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_authz_decider import ACCESS, CATALOG, NOW, ROOT, keys, session  # noqa: F401  (keys: a fixture)

SECRET_TEXT = "the-surrounding-text-must-not-leak-4411"

# (case, messages, the high-water mark expected, or None when nothing is recognised)
TABLE = [
    ("portion", ["(S//NF) " + SECRET_TEXT], "SECRET//NOFORN"),
    ("portion-lower-case", ["(s//nf) " + SECRET_TEXT], "SECRET//NOFORN"),
    ("portion-mid-sentence", [f"as the memo says (TS//SI//NF) {SECRET_TEXT}"], "TOP SECRET//NOFORN/SI"),
    ("portion-alone-at-line-start", [f"intro\n(S) {SECRET_TEXT}"], "SECRET"),
    ("portion-alone-numbered", [f"1. (C) {SECRET_TEXT}"], "CONFIDENTIAL"),
    ("fouo-is-cui", ["(U//FOUO) staff list"], "CUI"),
    ("cui-banner", ["CUI\n" + SECRET_TEXT], "CUI"),
    ("cui-category", ["CUI//SP-PRVCY " + SECRET_TEXT], "CUI"),
    ("releasability-adds-no-control", ["(C//REL TO USA, FVEY) " + SECRET_TEXT], "CONFIDENTIAL"),
    ("banner-line", ["SECRET\n" + SECRET_TEXT + "\nSECRET"], "SECRET"),
    ("banner-with-prefix", ["CLASSIFICATION: TOP SECRET\n" + SECRET_TEXT], "TOP SECRET"),
    ("banner-with-controls", ["TOP SECRET//SI-G ABCD//NOFORN\n" + SECRET_TEXT], "TOP SECRET//NOFORN/SI"),
    ("written-mixed-case", [f"it is Secret//NoForn: {SECRET_TEXT}"], "SECRET//NOFORN"),
    ("two-markings-one-sentence", ["SECRET//SI and TOP SECRET//TK"], "TOP SECRET//SI/TK"),
    ("in-a-code-block", ["```\n# (S//NF) " + SECRET_TEXT + "\nx = 1\n```"], "SECRET//NOFORN"),
    ("quoted", [f'> (TS//SI/TK//NOFORN) {SECRET_TEXT}'], "TOP SECRET//NOFORN/SI/TK"),
    ("in-quotation-marks", [f'he wrote "(S//NF) {SECRET_TEXT}"'], "SECRET//NOFORN"),
    ("split-across-messages", [f"{SECRET_TEXT} (S//", f"NF) {SECRET_TEXT}"], "SECRET//NOFORN"),
    ("high-water-across-messages", ["(C) one", "(U) two", "(S//NF) three"], "SECRET//NOFORN"),
    ("full-width-letters", ["（Ｓ//ＮＦ） " + SECRET_TEXT], "SECRET//NOFORN"),
    ("invisible-character-inside", ["S\u200bECRET//NOFORN " + SECRET_TEXT], "SECRET//NOFORN"),
    ("cyrillic-look-alikes", ["(\u0405//NF) " + SECRET_TEXT, "T\u041eP \u0405\u0415CRET//TK"], "TOP SECRET//NOFORN/TK"),
    # a hostile review's evasions: line endings, spacing, dashes, slashes and invisible characters of
    # other scripts, abbreviations in running text, a marking split over three messages
    ("crlf-banner", ["TOP SECRET\r\nThe plan."], "TOP SECRET"),
    ("cr-banner", ["SECRET\r"], "SECRET"),
    ("line-separator", ["TOP SECRET\u2028The plan."], "TOP SECRET"),
    ("two-spaces", ["TOP  SECRET\nx"], "TOP SECRET"),
    ("two-spaces-with-controls", ["TOP  SECRET//SI//NOFORN"], "TOP SECRET//NOFORN/SI"),
    ("tab", ["TOP\tSECRET//SI"], "TOP SECRET//SI"),
    ("en-dash", ["TOP\u2013SECRET//SI"], "TOP SECRET//SI"),
    ("variation-selector", ["SEC\ufe0fRET//NOFORN"], "SECRET//NOFORN"),
    ("hangul-filler", ["SEC\u3164RET//NOFORN"], "SECRET//NOFORN"),
    ("division-slashes", ["SECRET\u2215\u2215NOFORN"], "SECRET//NOFORN"),
    ("abbreviated-in-prose", ["see TS//SCI material"], "TOP SECRET"),
    ("abbreviated-dissem-in-prose", ["the s//nf annex"], "SECRET//NOFORN"),
    ("split-over-three-messages", ["hello (S", "//", "NF) the rest"], "SECRET//NOFORN"),
    ("split-after-a-long-message", ["x" * 500 + " (TS//SI", "//NF) y"], "TOP SECRET//NOFORN/SI"),
    # unmarked: ordinary prose that only looks like a marking
    ("url", ["see https://example.org/a//b and C:\\path"], None),
    ("unknown-after-abbreviation", ["s//x and c//hello"], None),
    ("word-secret-in-prose", ["the secret to good bread is time"], None),
    ("lone-lower-case-banner", ["secret"], None),
    ("copyright-sign", ["Copyright (C) 2026 Example Corp"], None),
    ("plural", ["list the item(s) below"], None),
    ("enumeration-lower-case", ["(a) first\n(c) third"], None),
    ("unclassified-only", ["UNCLASSIFIED\n(U) nothing here"], None),
    ("secrets-manager", ["store it in SecretsManager//prod"], None),
    ("empty", [""], None),
]


@pytest.mark.parametrize("case, messages, expected", TABLE, ids=[c[0] for c in TABLE])
def test_the_guard_finds_what_a_marked_text_says(case: str, messages: list[str], expected: str | None) -> None:
    found = markings.scan(messages)
    top = markings.high_water(found)
    assert (format_label(top) if top else None) == expected, (case, found)
    assert SECRET_TEXT not in markings.describe(found)  # where it stands, never the text around it


def test_a_marking_never_read_to_its_end_costs_no_more_than_its_length() -> None:
    """A nested pattern took seconds on 74 characters of `(S//SI/SI/...` without its `)` and doubled
    with each `/SI` (a hostile review). Linear now: this completes at once where it took hours."""
    for n in (40, 400):
        text = "(S//" + "/".join(["SI-X"] * n) + " x"
        assert markings.high_water(markings.scan([text * 3])) is not None  # read as SECRET//SI, no portion


def test_a_position_is_that_of_the_callers_own_text() -> None:
    """Normalising changes lengths (invisible characters removed, ligatures split): a position is
    mapped back, so it points at the marking in what the caller sent."""
    for text in ("\u200b" * 7 + "x SECRET//NOFORN", "\ufb01le \ufb01le SECRET//NOFORN", "ab\r\nSECRET//NOFORN"):
        [found] = markings.scan([text])
        assert text[found.offset:].replace("\u200b", "").startswith("SECRET"), (text, found)


@pytest.fixture(scope="module")
def policies(keys: Path) -> dict[str, decider.AuthzPolicy]:  # noqa: F811
    files = {**read_files(ROOT / "policies"), "catalog.toml": CATALOG, "access_policy.csv": ACCESS}
    out = {}
    for mode in ("enforce", "report", "off", "absent"):
        bundle = bundle_from_files(files)
        admission = None if mode == "absent" else Admission(content_marking=ContentMarkingGuard(mode=mode))
        bundle = msgspec.structs.replace(bundle, admission=admission)
        out[mode] = decider.AuthzPolicy(bundle=bundle, rules=AccessRules(bundle),
                                        keys=keyring([jwks_path(keys).read_text()]))
    return out


def _decide(policy: decider.AuthzPolicy, token: str, texts: list[str], model: str = "s-model",
            input_label: str | None = "UNCLASSIFIED", output_label: str | None = "UNCLASSIFIED"
            ) -> RequestAuthorized | RequestDenied:
    cmd = RequestSubmitted(event_id="r:submit", request_id="r", occurred_at=datetime.fromtimestamp(NOW, UTC),
                           policy_version="p", entry="nats", token=token, reply_to="inbox",
                           chat=ChatBody(model=model, messages=tuple(ChatMessage(role="user", content=t)
                                                                      for t in texts)),
                           input_label=input_label, output_label=output_label)
    [event] = decider.decide(cmd, decider.initial_state(), policy, datetime.fromtimestamp(NOW, UTC))
    assert isinstance(event, RequestAuthorized | RequestDenied)
    return event


def test_a_marked_paragraph_declared_unclassified_is_refused_by_content_marking(
        policies: dict[str, decider.AuthzPolicy], keys: Path) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))
    event = _decide(policies["enforce"], token, ["please summarise:", f"(S//NF) {SECRET_TEXT}"])
    assert isinstance(event, RequestDenied), event
    assert event.rule == "content-marking" and event.reason == "write_down"
    assert "(S//NF) at message 2, character 0" in event.detail and SECRET_TEXT not in event.detail
    assert event.input_label == "SECRET//NOFORN" and event.content_marking is not None
    assert event.content_marking.enforced and SECRET_TEXT not in msgspec.json.encode(event.content_marking).decode()


def test_a_marking_above_the_clearance_is_refused_even_when_nothing_is_declared(
        policies: dict[str, decider.AuthzPolicy], keys: Path) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))  # undeclared input: as high as the clearance
    event = _decide(policies["enforce"], token, ["TOP SECRET//TK\n" + SECRET_TEXT], input_label=None,
                    output_label="SECRET//SI/NOFORN")
    assert isinstance(event, RequestDenied) and event.rule == "content-marking", event
    assert event.reason == "clearance_insufficient"


def test_report_mode_records_the_marking_and_decides_as_declared(
        policies: dict[str, decider.AuthzPolicy], keys: Path) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))
    event = _decide(policies["report"], token, [f"(S//NF) {SECRET_TEXT}"])
    assert isinstance(event, RequestAuthorized), event
    assert event.input_label == "UNCLASSIFIED"
    assert event.content_marking is not None and not event.content_marking.enforced
    assert event.content_marking.label == "SECRET//NOFORN"


@pytest.mark.parametrize("mode", ["off", "absent"])
def test_no_guard_when_off_or_when_the_bundle_predates_it(policies: dict[str, decider.AuthzPolicy], keys: Path,
                                                          mode: str) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))
    event = _decide(policies[mode], token, [f"(S//NF) {SECRET_TEXT}"])
    assert isinstance(event, RequestAuthorized) and event.content_marking is None


def test_a_marking_the_declared_label_already_covers_changes_nothing(
        policies: dict[str, decider.AuthzPolicy], keys: Path) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))
    event = _decide(policies["enforce"], token, [f"(S//NF) {SECRET_TEXT}"], input_label="SECRET//NOFORN",
                    output_label="SECRET//NOFORN")
    assert isinstance(event, RequestAuthorized) and event.content_marking is None
    assert event.input_label == "SECRET//NOFORN"


def test_an_enforced_marking_that_no_rule_refuses_is_recorded_with_the_raised_label(
        policies: dict[str, decider.AuthzPolicy], keys: Path) -> None:  # noqa: F811
    token = session(keys, "SECRET", ("SI",), ("NOFORN",))
    event = _decide(policies["enforce"], token, [f"(S//NF) {SECRET_TEXT}"], input_label="SECRET",
                    output_label="SECRET//NOFORN")
    assert isinstance(event, RequestAuthorized), event
    assert event.input_label == "SECRET//NOFORN" and event.content_marking is not None


_MARKING_BITS = st.sampled_from(["(S//NF)", "(TS//SI)", "(C)", "(U//FOUO)", "SECRET", "TOP SECRET//TK", "CUI",
                                 "(s//nf)", "\n", " ", "x", "//", "(", ")", "CONFIDENTIAL//REL TO USA", "(S)"])
_TEXT = st.lists(st.one_of(_MARKING_BITS, st.text(max_size=8)), max_size=12).map("".join)
_LABELS = st.builds(lambda level, controls: format_label(Label(level=level, controls=frozenset(controls))),
                    st.integers(0, len(LEVELS) - 1), st.sets(st.sampled_from(["SI", "TK", "NOFORN"])))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(texts=st.lists(_TEXT, min_size=1, max_size=3), declared=_LABELS)
def test_the_guard_never_lowers_a_label(texts: list[str], declared: str) -> None:
    """Whatever the text, the label authz decides with dominates the one declared."""
    admission = Admission(content_marking=ContentMarkingGuard(mode="enforce"))
    cmd = RequestSubmitted(event_id="r:submit", request_id="r", occurred_at=datetime.fromtimestamp(NOW, UTC),
                           policy_version="p", entry="nats", token="t", reply_to="inbox",
                           chat=ChatBody(model="m", messages=tuple(ChatMessage(role="user", content=t) for t in texts)))
    marked = decider.content_marking(cmd, parse_label(declared), admission)
    if marked is not None:
        assert dominates(parse_label(marked.label), parse_label(declared))
        assert dominates(parse_label(marked.label), markings.high_water(markings.scan(texts)) or Label(level=0))
