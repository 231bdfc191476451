"""Upcasters: old event versions turned into current ones on read (STYLE §4).

Every event type is at version 1, so the chain is empty; the registry below is where a
`(type, version) -> (class, upcaster)` step goes when a Struct is frozen as `<Name>V1`.
"""

from collections.abc import Callable

from .events import CURRENT_EVENT_TYPES, Event

Upcaster = Callable[[Event], Event]

# (type tag, schema_version) -> the Struct that decodes that version and the step to the next.
# Current versions map to themselves with no step.
READERS: dict[tuple[str, int], tuple[type[Event], Upcaster | None]] = {
    (str(cls.__struct_config__.tag), 1): (cls, None) for cls in CURRENT_EVENT_TYPES
}


def upcast(event: Event, step: Upcaster | None) -> Event:
    """Apply one upcast step, if any; chains are walked by the codec."""
    return event if step is None else step(event)
