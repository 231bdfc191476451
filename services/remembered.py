"""Request ids a decider has already decided, remembered for a bounded time.

Deciders are idempotent: once the events they decided are folded in, the same input decides
nothing, even when it arrives again after the broker's duplicate window (a redelivery, or a copy a
credential made the server store). Folding one more id must not copy them all, so the newest few
are a small dict and the rest frozen generations, dropped whole once they age out.

A frozen generation keeps 16-byte digests of its ids, sorted in one bytes object: 16 bytes an id,
where a set of the ids themselves cost about 120 (the soak saw the router grow by them). A false
"seen" would need two ids of a 2-day window to share a 128-bit BLAKE2b digest.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sized
from datetime import datetime, timedelta
from typing import TypeVar

from msgspec import Struct

HORIZON = timedelta(days=2)
DIGEST_BYTES = 16
GENERATION = 256  # ids in the mutable-by-copy recent dict before it is frozen into a generation
MERGED = 65_536  # generations merge pairwise up to this size, so a lookup tries only a few


Kept = TypeVar("Kept", bound=Sized)


def seal(generations: tuple[tuple[datetime, Kept], ...], sealed: tuple[datetime, Kept],
         union: Callable[[Kept, Kept], Kept], limit: int = MERGED) -> tuple[tuple[datetime, Kept], ...]:
    """`generations` (oldest first) plus `sealed`, merged like a binary counter: the newest two while
    the older is no bigger and the result stays under `limit`. Each entry is copied O(log n) times and
    a lookup tries O(log n) generations. A merged generation ages out by its newest entry, so an
    entry may be kept longer than its horizon, never shorter."""
    merged = list(generations)
    while merged and len(merged[-1][1]) <= len(sealed[1]) and len(merged[-1][1]) + len(sealed[1]) <= limit:
        older = merged.pop()
        sealed = (max(older[0], sealed[0]), union(older[1], sealed[1]))
    return (*merged, sealed)


def digest(request_id: str) -> bytes:
    """The id as a generation keeps it."""
    return hashlib.blake2b(request_id.encode(), digest_size=DIGEST_BYTES).digest()


class Digests(Struct, frozen=True):
    """Distinct digests, sorted, concatenated: membership by binary search."""

    blob: bytes = b""

    def __post_init__(self) -> None:
        # a snapshot read back must be whole and sorted, or the search would miss ids (a closed
        # request reserved again): refused, the budget replays its ledger instead
        if len(self.blob) % DIGEST_BYTES:
            raise ValueError(f"digests of {len(self.blob)} bytes, not a multiple of {DIGEST_BYTES}")
        if any(a >= b for a, b in itertools.pairwise(self)):
            raise ValueError("digests not sorted and distinct")

    @classmethod
    def of(cls, digests: Iterable[bytes]) -> Digests:
        return cls(b"".join(sorted(set(digests))))

    def __len__(self) -> int:
        return len(self.blob) // DIGEST_BYTES

    def __iter__(self) -> Iterator[bytes]:
        return (self.blob[i:i + DIGEST_BYTES] for i in range(0, len(self.blob), DIGEST_BYTES))

    def __contains__(self, wanted: object) -> bool:
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.blob[mid * DIGEST_BYTES:(mid + 1) * DIGEST_BYTES] < wanted:  # type: ignore[operator]
                lo = mid + 1
            else:
                hi = mid
        return self.blob[lo * DIGEST_BYTES:(lo + 1) * DIGEST_BYTES] == wanted

    def union(self, other: Digests) -> Digests:
        return Digests.of((*self, *other))


class Remembered(Struct, frozen=True, kw_only=True):
    """Ids seen, with when, for HORIZON."""

    recent: dict[str, datetime] = {}
    generations: tuple[tuple[datetime, Digests], ...] = ()  # (newest time, ids' digests), oldest first

    def __contains__(self, request_id: str) -> bool:
        if request_id in self.recent:
            return True
        if not self.generations:
            return False
        wanted = digest(request_id)
        return any(wanted in ids for _, ids in self.generations)

    def __len__(self) -> int:
        return len(self.recent) + sum(len(ids) for _, ids in self.generations)

    def add(self, request_id: str, at: datetime) -> Remembered:
        """These ids plus one, seen at `at`; generations older than the horizon are dropped."""
        horizon = at - HORIZON
        generations = tuple(g for g in self.generations if g[0] >= horizon)
        if len(self.recent) < GENERATION:
            return Remembered(recent={**self.recent, request_id: at}, generations=generations)
        sealed = (max(self.recent.values()), Digests.of(digest(i) for i in self.recent))
        return Remembered(recent={request_id: at}, generations=seal(generations, sealed, Digests.union))
