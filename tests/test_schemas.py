"""The event contract: golden files decode forever, the codec round-trips, subjects are derived."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.events import CURRENT_EVENT_TYPES, RequestAuthorized
from enclave_gateway.schemas.upcast import current_version

from .samples import samples, upcast_samples

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = {type(e).__name__: e for e in samples()}


def test_every_event_type_has_a_sample_and_a_golden_file() -> None:
    names = {cls.__name__ for cls in CURRENT_EVENT_TYPES}
    assert names == set(SAMPLES)
    assert names <= {p.name for p in GOLDEN.iterdir()}


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*/v*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_file_decodes_to_the_current_type(path: Path) -> None:
    event = codec.decode_event(path.read_bytes())
    assert type(event).__name__ == path.parent.name
    version = int(path.stem.removeprefix("v"))
    assert event == upcast_samples().get((path.parent.name, version), SAMPLES[path.parent.name])


def test_every_current_version_has_its_golden_file() -> None:
    for cls in CURRENT_EVENT_TYPES:
        assert (GOLDEN / cls.__name__ / f"v{current_version(cls)}.json").is_file(), cls.__name__


@pytest.mark.parametrize("event", samples(), ids=lambda e: type(e).__name__)
def test_round_trip_and_subject(event: msgspec.Struct) -> None:
    data = codec.encode(event)
    assert codec.decode_event(data) == event
    subject = subjects.for_event(event)  # type: ignore[arg-type]
    assert subject.startswith("gw.evt.") and " " not in subject and "*" not in subject


def test_an_old_reader_skips_fields_it_does_not_know() -> None:
    data = codec.encode(SAMPLES["RequestAuthorized"])
    newer = data[:-1] + b',"added_in_v2":{"x":1}}'
    assert codec.decode_event(newer) == SAMPLES["RequestAuthorized"]


@pytest.mark.parametrize("data, needle", [
    (b"{}", "missing required field `type`"),
    (b'{"type": "NoSuchEvent"}', "unknown event type"),
    (b'{"type": "RequestAuthorized", "schema_version": 99}', "v99"),
    (b'{"type": "RequestAuthorized"}', "missing required field"),
    (b"\xff\xfe", "malformed"),
    (b'{"type":"BudgetRejected","event_id":"x\xff,"request_id":"r1"}', "malformed"),  # not UTF-8 in a string
    (b'{"type":"RequestSubmitted","event_id":"x\xff"}', "(?i)utf-8"),
])
def test_bad_bytes_are_a_decode_error_naming_the_problem(data: bytes, needle: str) -> None:
    with pytest.raises(codec.DecodeError, match=needle):
        codec.decode_event(data)


def test_decode_as_refuses_the_wrong_type() -> None:
    with pytest.raises(codec.DecodeError, match="expected RequestAuthorized"):
        codec.decode_as(codec.encode(SAMPLES["RequestDenied"]), RequestAuthorized)


@pytest.mark.parametrize("name, safe", [("alpha", "alpha"), ("llama-3.1-8b", "llama-3_1-8b"), ("a b>*", "a_b__"),
                                        ("", "_")])
def test_partition_tokens_are_subject_safe(name: str, safe: str) -> None:
    assert subjects.token(name) == safe


def test_ledger_subject_and_cas_filter_come_from_one_team_name() -> None:
    for team in ("alpha", "team.with.dots"):
        subj, filt = subjects.ledger("reserved", team), subjects.ledger_filter(team)
        assert filt.replace("*", "reserved") == subj


def test_an_event_relabelled_as_an_older_version_is_refused_not_read_as_less() -> None:
    """Found by a hostile review: a v3 route relabelled v2 read as v2 (its protocol and figures
    dropped, the invoker ignoring them) and replay compared it as v2. A stored version's frozen
    reader takes exactly that version's fields."""
    data = codec.encode(SAMPLES["RouteSelected"])
    assert b'"schema_version":3' in data
    for older in (b'"schema_version":2', b'"schema_version":1'):
        with pytest.raises(codec.DecodeError, match="unknown field"):
            codec.decode_event(data.replace(b'"schema_version":3', older))


def test_a_stored_version_is_read_one_version_at_a_time_up_to_the_current() -> None:
    """Issue 11 item 9 (in part): upcasters form a chain the codec walks (RouteSelected v1 -> v2 -> v3)."""
    from enclave_gateway.schemas.events.route import RouteSelectedV1, RouteSelectedV2
    from enclave_gateway.schemas.upcast import READERS

    cls, step = READERS[("RouteSelected", 1)]
    assert cls is RouteSelectedV1 and step is not None
    old = codec._decoder(cls).decode((GOLDEN / "RouteSelected" / "v1.json").read_bytes())
    middle = step(old)
    assert isinstance(middle, RouteSelectedV2) and middle.schema_version == 2  # one step, not a leap
    event = codec.decode_event((GOLDEN / "RouteSelected" / "v1.json").read_bytes())
    assert type(event).__name__ == "RouteSelected" and event.schema_version == current_version(type(event))
    assert event == upcast_samples()[("RouteSelected", 1)]


def test_an_id_or_team_too_long_for_a_subject_or_header_is_a_decode_error() -> None:
    """A review forged a 400,000-character request id and a 5,000-character team: the stage's next
    publish broke the server's limits and its connection was closed for good. Such events are now
    refused as input (MessageRejected), never acted on."""
    import msgspec as _msgspec
    from enclave_gateway.schemas import codec as _codec

    from .samples import SAMPLES_BY_NAME as _SAMPLES

    failed = _SAMPLES["RequestFailed"]
    for forged in (_msgspec.structs.replace(failed, request_id="r" * 400_000),
                   _msgspec.structs.replace(failed, event_id="e" * 1_000)):
        with pytest.raises(_codec.DecodeError):
            _codec.decode_event(_codec.encode(forged))
    done = _SAMPLES["InvocationCompleted"]
    held = done.reservation  # type: ignore[attr-defined]
    forged = _msgspec.structs.replace(done, reservation=_msgspec.structs.replace(held, team="t" * 5000))
    with pytest.raises(_codec.DecodeError):
        _codec.decode_event(_codec.encode(forged))
    assert _codec.decode_event(_codec.encode(done)) == done  # what every stage writes still reads
