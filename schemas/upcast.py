"""Upcasters: old event versions turned into current ones on read (STYLE §4).

Each `(type, version) -> (class, upcaster)` entry decodes a stored version with the Struct frozen
for it (`<Name>V1`) and takes it one step towards the current one; current versions map to
themselves with no step.
"""

from collections.abc import Callable
from typing import Any, cast

import msgspec

from .events import (
    CURRENT_EVENT_TYPES,
    BudgetRejected,
    BudgetReserved,
    Event,
    InvocationCompleted,
    InvocationFailed,
    RequestAuthorized,
    RequestDenied,
    RequestSubmitted,
    RouteSelected,
    RouteUnavailable,
)
from .events.budget import BudgetRejectedV1, BudgetReservedV1, BudgetReservedV2
from .events.invocation import InvocationCompletedV1, InvocationFailedV1
from .events.request import RequestAuthorizedV1, RequestAuthorizedV2, RequestDeniedV1, RequestSubmittedV1
from .events.route import RouteSelectedV1, RouteSelectedV2, RouteUnavailableV1

Upcaster = Callable[[Event], Event]


def current_version(cls: type[Event]) -> int:
    """The `schema_version` a current event type writes."""
    field = next(f for f in msgspec.structs.fields(cls) if f.name == "schema_version")
    return int(cast(Any, field.default))


def carried(current: type[Event], fill: Callable[[Any], dict[str, Any]] | None = None) -> Upcaster:
    """The step from a version whose fields the current one keeps: the fields it adds take their
    defaults (the request's deadline: none was set before it existed), or what `fill` says of the
    old event."""

    def step(old: Event) -> Event:
        fields = msgspec.structs.asdict(old)
        fields.pop("schema_version")
        return current(**fields, **(fill(old) if fill else {}))

    return step


# (type tag, schema_version) -> the Struct that decodes that version and the step to the next.
# Current versions map to themselves with no step.
READERS: dict[tuple[str, int], tuple[type[Event], Upcaster | None]] = {
    **{(str(cls.__struct_config__.tag), current_version(cls)): (cls, None) for cls in CURRENT_EVENT_TYPES},
    # a v1 route was its request's first and only attempt
    ("RouteSelected", 1): (RouteSelectedV1, carried(RouteSelectedV2)),  # then v2's step to the current
    # a v2 route was ranked in catalog order (or by weight, which replay draws again)
    ("RouteSelected", 2): (RouteSelectedV2, carried(RouteSelected)),
    # a v1 failure ended its request: the budget released and the caller heard of it
    ("InvocationFailed", 1): (InvocationFailedV1, carried(InvocationFailed, lambda old: {
        "final": True, "requested_model": old.model_id})),
    # a v1 completion was answered whole, with the usage its server reported
    ("InvocationCompleted", 1): (InvocationCompletedV1, carried(InvocationCompleted)),
    ("RouteUnavailable", 1): (RouteUnavailableV1, carried(RouteUnavailable)),
    ("RequestSubmitted", 1): (RequestSubmittedV1, carried(RequestSubmitted)),
    ("RequestAuthorized", 1): (RequestAuthorizedV1, carried(RequestAuthorizedV2)),
    # v2 authorizations and v1 denials were decided before markings in the prompt were read
    ("RequestAuthorized", 2): (RequestAuthorizedV2, carried(RequestAuthorized)),
    ("RequestDenied", 1): (RequestDeniedV1, carried(RequestDenied)),
    ("BudgetReserved", 1): (BudgetReservedV1, carried(BudgetReservedV2)),
    # v2 reservations and v1 refusals were decided before rate limits: counted against none
    ("BudgetReserved", 2): (BudgetReservedV2, carried(BudgetReserved)),
    ("BudgetRejected", 1): (BudgetRejectedV1, carried(BudgetRejected)),
}


def upcast(event: Event, step: Upcaster | None) -> Event:
    """Apply the step, then each next one, until the event is at its type's current version: a
    stored version is taken one version at a time (v1 -> v2 -> v3), so each step stays small."""
    for _ in range(32):  # more steps than any type has versions: a cycle is a bug, not a loop forever
        if step is None:
            return event
        event = step(event)
        reader = READERS.get((str(type(event).__struct_config__.tag), event.schema_version))
        step = None if reader is None or type(event) is not reader[0] else reader[1]
    raise RuntimeError(f"upcasters of {type(event).__name__} do not reach its current version")
