"""Classification labels and the lattice they form (DESIGN §3).

A label is a level (UNCLASSIFIED < CUI < CONFIDENTIAL < SECRET < TOP SECRET) plus a set of
controls: compartments (SI, TK, ...) and dissemination caveats (NOFORN, ...). Both use superset
semantics, so they share one set: `a` dominates `b` when `a.level >= b.level` and `a`'s controls
include all of `b`'s. Written as a marking string `LEVEL[//CONTROL/CONTROL...][//CONTROL...]`,
e.g. `SECRET//SI/TK//NOFORN`; abbreviations U, CUI, C, S, TS are accepted.
"""

from __future__ import annotations

import functools
import re

from msgspec import Struct

LEVELS = ("UNCLASSIFIED", "CUI", "CONFIDENTIAL", "SECRET", "TOP SECRET")
_ALIASES = {
    "U": 0,
    "UNCLASSIFIED": 0,
    "CUI": 1,
    "C": 2,
    "CONFIDENTIAL": 2,
    "S": 3,
    "SECRET": 3,
    "TS": 4,
    "TOP SECRET": 4,
    "TOP_SECRET": 4,
    "TOPSECRET": 4,
}
_CONTROL = re.compile(r"^[A-Z0-9][A-Z0-9 _-]{0,31}$")


class LabelError(ValueError):
    """A marking string that is not a label; the message says what is wrong."""


class Label(Struct, frozen=True, kw_only=True, gc=False):
    """A point in the lattice."""

    level: int
    controls: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return format_label(self)


def dominates(a: Label, b: Label) -> bool:
    """Whether information labelled `b` may flow to something labelled `a`."""
    return a.level >= b.level and a.controls >= b.controls


def join(a: Label, b: Label) -> Label:
    """The least label that dominates both (the high-water mark)."""
    return Label(level=max(a.level, b.level), controls=a.controls | b.controls)


@functools.lru_cache(maxsize=4096)  # pure, and the same few markings recur on every request
def parse_label(text: str) -> Label:
    """Parse a marking string; raises LabelError. ASCII only: Unicode case rules would read
    `SECRET//ſI` (a long s) as `SECRET//SI`."""
    if not text.isascii():
        raise LabelError("a classification label is ASCII only")
    parts = [p.strip() for p in text.strip().upper().split("//")]
    if not parts or not parts[0]:
        raise LabelError(f"empty classification in {text!r}")
    level = _ALIASES.get(parts[0])
    if level is None:
        raise LabelError(f"unknown classification level {parts[0]!r} (expected one of {', '.join(LEVELS)})")
    controls: set[str] = set()
    for section in parts[1:]:
        for control in section.split("/"):
            control = control.strip()
            if not _CONTROL.match(control):
                raise LabelError(f"invalid compartment or caveat {control!r} in {text!r}")
            controls.add(control)
    return Label(level=level, controls=frozenset(controls))


def make_label(level: str, compartments: tuple[str, ...] = (), caveats: tuple[str, ...] = ()) -> Label:
    """A label from a level name and separate compartment and caveat lists (token claims)."""
    marking = level + "".join(f"//{c}" for c in (*compartments, *caveats))
    return parse_label(marking)


@functools.lru_cache(maxsize=4096)
def format_label(label: Label) -> str:
    """The canonical marking string: level, then controls sorted."""
    controls = "/".join(sorted(label.controls))
    return LEVELS[label.level] + (f"//{controls}" if controls else "")


UNCLASSIFIED = Label(level=0)
