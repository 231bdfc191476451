"""Rate limits (issue 12 item 1), as pure functions: which counters a request is added to, whether
what they read refuses it, and what is given back once it is refused or has used less.

The counting itself is JetStream's: each limit is a counter (ADR-49) in the stream GW_RATES, one
subject per scope, key, kind and UTC minute; an increment returns the counter's new value in its
acknowledgement, atomically, whichever replica sent it. A request is admitted when no counter it
was added to reads over its limit. There is no lock and no count of ours: two replicas racing for
the last slot get different values back, and the one over the limit refuses.

Counts are taken in a fixed order (team, application, model; requests, then tokens) and stop at
the first over its limit. A refused request gives back what it took, so a race may refuse a
request another one's give-back would have made room for (never admit one too many). Tokens are
the prompt's bound plus the most the answer may use, as the budget reserves money; once the answer
is settled, what it did not use is given back (a request that fails keeps its count: the model
server may have worked on it). Windows are
fixed UTC minutes: a burst may straddle a minute's end, as with any fixed-window limiter.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Literal

from ...schemas import subjects
from ...schemas.events import RateCount, RequestAuthorized
from ...schemas.policy import PolicyBundle, RateLimit

Scope = Literal["team", "application", "model"]


def window_of(now: datetime) -> str:
    """The UTC minute `now` falls in."""
    return now.strftime("%Y-%m-%dT%H:%M")


def retry_after_s(now: datetime) -> int:
    """Whole seconds until the minute after `now` starts (at least 1): HTTP's Retry-After."""
    start = now.replace(second=0, microsecond=0)
    return max(1, int(((start + timedelta(minutes=1)) - now).total_seconds() + 0.999))


def _limits(event: RequestAuthorized, policy: PolicyBundle) -> Iterator[tuple[Scope, str, RateLimit]]:
    admission = policy.admission
    if admission is None:
        return
    scopes: tuple[tuple[Scope, str, dict[str, RateLimit]], ...] = (
        ("team", event.caller.team, admission.team),
        ("application", event.caller.subject, admission.application),
        ("model", event.model_id, admission.model),
    )
    for scope, key, limits in scopes:
        limit = limits.get(key)
        if limit is not None:
            yield scope, key, limit


def to_count(event: RequestAuthorized, policy: PolicyBundle, now: datetime, tokens: int) -> tuple[RateCount, ...]:
    """The counts a request takes, in order, with nothing observed yet (`observed` 0); `tokens` is
    its bound (the budget's: prompt bound plus output bound)."""
    window = window_of(now)
    out: list[RateCount] = []
    for scope, key, limit in _limits(event, policy):
        if limit.requests_per_minute is not None:
            out.append(RateCount(scope=scope, key=key, kind="requests", window=window, counted=1, observed=0,
                                 limit=limit.requests_per_minute))
        if limit.tokens_per_minute is not None and tokens > 0:  # 0: no such model, refused anyway
            out.append(RateCount(scope=scope, key=key, kind="tokens", window=window, counted=tokens, observed=0,
                                 limit=limit.tokens_per_minute))
    return tuple(out)


def over(count: RateCount) -> bool:
    """Whether this count refuses its request."""
    return count.observed > count.limit


def refusal(rates: tuple[RateCount, ...]) -> RateCount | None:
    """The count that refuses the request (the first over its limit), or None."""
    return next((c for c in rates if over(c)), None)


def subject(count: RateCount) -> str:
    """The counter `count` was taken from."""
    return subjects.rate_counter(count.window, count.scope, count.key, count.kind)


def give_back(rates: tuple[RateCount, ...], used_tokens: int, now: datetime) -> list[tuple[str, int]]:
    """(counter, negative delta) to send once a request is settled: the tokens it did not use.
    Requests stay counted once admitted, and a request that failed or was abandoned keeps its
    tokens counted: a model server may have worked on it, whatever reached the caller. Counters of
    a minute that has ended are left alone: nothing reads them any more."""
    current = window_of(now)
    out = []
    for count in rates:
        if count.window == current and count.kind == "tokens":
            unused = count.counted - min(count.counted, max(0, used_tokens))
            if unused:
                out.append((subject(count), -unused))
    return out


def give_back_refused(rates: tuple[RateCount, ...], now: datetime) -> list[tuple[str, int]]:
    """(counter, negative delta) for every count a refused request took, in its minute."""
    current = window_of(now)
    return [(subject(c), -c.counted) for c in rates if c.window == current and c.counted]
