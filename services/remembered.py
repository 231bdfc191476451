"""Request ids a decider has already decided, remembered for a bounded time (issue 9 item 2).

Deciders are idempotent: once the events they decided are folded in, the same input decides
nothing, even when it arrives again after the broker's duplicate window (a redelivery, or a copy a
credential made the server store). Folding one more id must not copy them all, so the newest few
are a small dict and the rest frozen generations, dropped whole once they age out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import TypeVar

from msgspec import Struct

HORIZON = timedelta(days=2)
GENERATION = 256  # ids in the mutable-by-copy recent dict before it is frozen into a generation
MERGED = 65_536  # generations merge pairwise up to this size, so a lookup tries only a few


Sized = TypeVar("Sized", bound=Collection[str])


def seal(generations: tuple[tuple[datetime, Sized], ...], sealed: tuple[datetime, Sized],
         union: Callable[[Sized, Sized], Sized]) -> tuple[tuple[datetime, Sized], ...]:
    """`generations` (oldest first) plus `sealed`, merged like a binary counter: the newest two while
    the older is no bigger and the result stays under MERGED. Each entry is copied O(log n) times and
    a lookup tries O(log n) generations. A merged generation ages out by its newest entry, so an
    entry may be kept longer than its horizon, never shorter."""
    merged = list(generations)
    while merged and len(merged[-1][1]) <= len(sealed[1]) and len(merged[-1][1]) + len(sealed[1]) <= MERGED:
        older = merged.pop()
        sealed = (max(older[0], sealed[0]), union(older[1], sealed[1]))
    return (*merged, sealed)


class Remembered(Struct, frozen=True, kw_only=True):
    """Ids seen, with when, for HORIZON."""

    recent: dict[str, datetime] = {}
    generations: tuple[tuple[datetime, frozenset[str]], ...] = ()  # (newest time, ids), oldest first

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.recent or any(request_id in ids for _, ids in self.generations)

    def __len__(self) -> int:
        return len(self.recent) + sum(len(ids) for _, ids in self.generations)

    def add(self, request_id: str, at: datetime) -> Remembered:
        """These ids plus one, seen at `at`; generations older than the horizon are dropped."""
        horizon = at - HORIZON
        generations = tuple(g for g in self.generations if g[0] >= horizon)
        if len(self.recent) < GENERATION:
            return Remembered(recent={**self.recent, request_id: at}, generations=generations)
        sealed = (max(self.recent.values()), frozenset(self.recent))
        return Remembered(recent={request_id: at}, generations=seal(generations, sealed, frozenset.union))
