"""The envelope every event carries (DESIGN §2).

These types reflect the actual storage format of the audit trail and hence must be versioned
with care: never edit a released Struct, freeze it as `<Name>V<n>` and add an upcaster (STYLE §4).
"""

from datetime import datetime
from typing import Annotated, TypedDict

from msgspec import Meta, Struct

# Bounds on what becomes a subject token or a header: an id or team name of any length, forged
# with a service credential, made a stage's next publish exceed the server's control-line or
# payload limit, and the server closed that stage's connection (a hostile review). Every id and
# team ever recorded is far shorter (uuid hex, `seq-N`; policy teams are at most 64 characters).
RequestId = Annotated[str, Meta(max_length=128)]
EventId = Annotated[str, Meta(max_length=256)]
TeamName = Annotated[str, Meta(max_length=256)]


class Event(Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of every event: a past-tense fact with the policy version it was decided under."""

    event_id: EventId
    request_id: RequestId
    occurred_at: datetime
    policy_version: str
    schema_version: int = 1
    # The input this fact was decided from: its event id and stream sequence (issue 9), so replay
    # pairs every output with its input. Set by the shell, which knows the sequence; None for facts
    # decided from no stored input (an entry's own facts, expiry) and for events recorded earlier.
    causation_id: str | None = None
    causation_seq: int | None = None


class Caller(Struct, frozen=True, kw_only=True, gc=False):
    """Who asked, as proven by a verified session token."""

    subject: str
    team: TeamName
    roles: tuple[str, ...] = ()
    token_id: str = ""
    clearance: str | None = None  # the session's label: level, compartments and caveats


class Reservation(Struct, frozen=True, kw_only=True, gc=False):
    """Money held for one request until it is settled or released (integer micro-units)."""

    team: TeamName
    period: str
    micros: int


class Envelope(TypedDict):
    """The envelope fields as keyword arguments, so deciders build them in one place."""

    event_id: str
    request_id: str
    occurred_at: datetime
    policy_version: str


def envelope(request_id: str, stage: str, now: datetime, policy_version: str) -> Envelope:
    """Envelope of the event a stage decides for a request; its id doubles as `Nats-Msg-Id`."""
    return Envelope(
        event_id=f"{request_id}:{stage}", request_id=request_id, occurred_at=now, policy_version=policy_version
    )
