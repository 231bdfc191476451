"""Router decider: pick the model and endpoint for a funded request, and the next one when an
attempt fails (DESIGN §5, issue 10).

The catalog resolves aliases and deprecated names to what actually runs; `RouteSelected`
records the substitution so a rename needs a catalog change and nothing else. A model's endpoints
are tried in catalog order, or, for a "weighted" model, a first attempt draws its endpoint by
weight from the request id (load spread over replicas of a model server). A failed attempt
(`InvocationFailed`, not final) is routed again to the next endpoint not yet tried, from the route
this router recorded for that attempt (never from what the failure says the request was: the
invoker may report outcomes, not make requests), so every fallback is a recorded decision that
replay re-makes; when none is left the request ends with `RouteUnavailable`, which releases its
reservation and answers the caller.

A failure that may pass (a timeout, a refused connection, a 5xx or 429) is first retried on the
same endpoint, `retries_per_endpoint` times, each after an exponential backoff with a jitter
derived from the request (so every replica and replay agree), never ending past the deadline: the
route carries `not_before` and the invoker waits until then.

A circuit breaker per endpoint counts its failed attempts in a sliding window: `breaker_failures`
of them within the last `breaker_cooldown_s` open it, and an open endpoint is passed over while
another is left; as they age out it is tried again. Only failures up to the decision's `now` count
(one dated in the future counts for nothing), each once (a copy has the same event id), and time is
the decision's `now`, never a clock read here. When every endpoint left is open the first is tried
anyway: a breaker reorders, it never fails a request by itself. No attempt starts after the
request's deadline: the request ends with RouteUnavailable(timeout).
"""

import hashlib
from datetime import datetime, timedelta

import msgspec
from msgspec import Struct

from ...schemas.commands import ChatBody
from ...schemas.events import (
    AnyEvent,
    BudgetReserved,
    Caller,
    Envelope,
    Event,
    InvocationCompleted,
    InvocationFailed,
    Reservation,
    RouteSelected,
    RouteUnavailable,
    envelope,
)
from ...schemas.events.route import Skipped
from ...schemas.policy import ModelEntry, PolicyBundle
from ...schemas.reasons import CONTEXT_EXCEEDED, REFUSED_AS_MALFORMED, STREAM_BROKEN
from .. import catalog
from ..remembered import Remembered, seal

STAGE = "route"
RouterInput = BudgetReserved | InvocationFailed
KEPT_FAILURES = 100  # per endpoint: policy validation caps breaker_failures at 100
ROUTES_KEPT = timedelta(hours=1)  # a route with no deadline (v1): longer than any request waits for its next attempt
# A route is needed until its request's deadline, and a little after: a failure then ends the request
# as `timeout`. Later the budget has long ended it (its DEADLINE_GRACE, 5 s), the caller was answered
# at the deadline, and a failure stored that late is routed nowhere. Kept for an hour, routes held
# the router's memory growing by ~1.4 KB a request for an hour (the soak).
ROUTE_GRACE = timedelta(minutes=1)
# routes are dropped only this far past their keep-until, as seen from the newest route folded, so a
# replica whose clock is behind another's never misses a route a lookup at its own `now` would find
DROP_MARGIN = timedelta(minutes=1)
ROUTES_RECENT = 256
# A merged generation is dropped only once its newest route is no longer needed, so its size bounds
# how long a route outlives its need: 4,096 routes are under two minutes at 40 requests a second.
# (Merged up to remembered.MERGED, one held 27 minutes of routes and the soak saw the router grow.)
ROUTES_MERGED = 4_096


class Breaker(Struct, frozen=True, kw_only=True):
    """An endpoint's recent failed attempts, (when, event id), in the order they were stored."""

    failures: tuple[tuple[datetime, str], ...] = ()


def keep_until(route: RouteSelected) -> datetime:
    """Until when the route may still be needed: its deadline and ROUTE_GRACE (no deadline: ROUTES_KEPT)."""
    if route.deadline_at is None:
        return route.occurred_at + ROUTES_KEPT
    return route.deadline_at + ROUTE_GRACE


class Routes(Struct, frozen=True, kw_only=True):
    """The newest route of each request in flight, by request id, until `keep_until`.

    Adding one must not copy them all (a router folds every route in flight): the newest few are a
    small dict, the rest frozen generations merged like a binary counter (`seal`, as `Remembered`
    does), each dropped whole once every route in it is past `keep_until` (and DROP_MARGIN, on the
    folding router's clock). A decision looks up at the router's own time, never earlier than any
    fold before it, so what it finds depends on the routes folded and that time, not on when a
    generation was dropped, and replay finds what the live router found. Completions look up at
    their own time: what a router learns of latency is best effort, and replay checks it as a range.
    """

    recent: dict[str, RouteSelected] = {}
    generations: tuple[tuple[datetime, dict[str, RouteSelected]], ...] = ()  # (latest keep-until, routes), oldest first
    # False in what replay decides on (`as_recorded`): a recorded decision was made on a route the
    # router then held, and routers before this one held routes an hour, past any keep-until
    expire: bool = True

    def get(self, request_id: str, now: datetime) -> RouteSelected | None:
        """The newest route of the request, if one is kept and still needed at `now`."""
        found = self.recent.get(request_id)
        for _, routes in reversed(self.generations):
            if found is not None:
                break
            found = routes.get(request_id)
        if found is None or (self.expire and keep_until(found) < now):
            return None
        return found

    def add(self, route: RouteSelected, now: datetime | None = None) -> "Routes":
        """These routes plus one; generations no longer needed are dropped. `now` is the folding
        router's clock: a route dated ahead of it (another replica's clock, or a forged date) must
        not drop what a lookup at this router's own time would still find."""
        horizon = (route.occurred_at if now is None else min(route.occurred_at, now)) - DROP_MARGIN
        generations = tuple(g for g in self.generations if g[0] >= horizon)
        if len(self.recent) < ROUTES_RECENT:
            return Routes(recent={**self.recent, route.request_id: route}, generations=generations,
                          expire=self.expire)
        sealed = (max(keep_until(r) for r in self.recent.values()), dict(self.recent))
        return Routes(recent={route.request_id: route},
                      generations=seal(generations, sealed, _newer_wins, ROUTES_MERGED), expire=self.expire)


def _newer_wins(older: dict[str, RouteSelected], newer: dict[str, RouteSelected]) -> dict[str, RouteSelected]:
    return {**older, **newer}


class Observed(Struct, frozen=True, kw_only=True):
    """An endpoint's observed latency: a moving average of its completions' (each weighs LATENCY_WEIGHT)."""

    ms: float
    completions: int = 1
    recent: tuple[str, ...] = ()  # the newest completions' event ids: each counts once


LATENCY_WEIGHT = 0.2  # recent completions count most: a server that slows down is passed over soon
LATENCY_RECENT = 64
MAX_LATENCY_MS = 3_600_000.0  # an hour: longer is a broken figure, not a slow server


class RouterState(Struct, frozen=True, kw_only=True):
    """The attempts already routed, as `request_id#attempt` (idempotency); the newest route of each
    request in flight, by request id; each endpoint's breaker and observed latency."""

    routed: Remembered = Remembered()
    routes: Routes = Routes()
    breakers: dict[str, Breaker] = {}
    latency: dict[str, Observed] = {}
    # endpoints no invoker was pulling routes for, as the shell last saw their durables: passed over
    # like an open circuit and recorded as skipped ("no_invoker"), the figure replay decides on
    unserved: frozenset[str] = frozenset()


def failures_within(breaker: Breaker | None, policy: PolicyBundle, now: datetime) -> int:
    """Failed attempts in the breaker's window ending at `now`."""
    if breaker is None:
        return 0
    start = now - timedelta(seconds=policy.catalog.routing.breaker_cooldown_s)
    return sum(1 for at, _ in breaker.failures if start < at <= now)


def circuit_open(breaker: Breaker | None, policy: PolicyBundle, now: datetime) -> bool:
    """Whether requests avoid the endpoint now."""
    return failures_within(breaker, policy, now) >= policy.catalog.routing.breaker_failures


def as_recorded(route: RouteSelected | RouteUnavailable, policy: PolicyBundle,
                previous: RouteSelected | None = None) -> RouterState:
    """What replay decides a route (or the end of one) again on: the breakers it says were open
    (replay checks that the stream backs each claim), the latency figures it ranked by and, for a
    fallback, the route of the failed attempt."""
    failing = Breaker(failures=tuple((route.occurred_at, f"claimed-{i}")
                                     for i in range(policy.catalog.routing.breaker_failures)))
    observed = route.observed_ms if isinstance(route, RouteSelected) else ()
    unserved = frozenset(s.endpoint for s in route.skipped if s.reason == "no_invoker") if isinstance(
        route, RouteSelected) else frozenset()
    return RouterState(routes=Routes(expire=False) if previous is None else Routes(expire=False).add(previous),
                       breakers={e: failing for e in route.circuit_open},
                       latency={e: Observed(ms=ms) for e, ms in observed}, unserved=unserved)


class _Ask(Struct, frozen=True, kw_only=True):
    """What routing needs of a request, from its reservation or from the route of a failed attempt."""

    request_id: str
    caller: Caller
    requested_model: str
    model_id: str
    max_tokens: int
    chat: ChatBody
    reservation: Reservation
    reply_to: str
    attempt: int
    tried: tuple[str, ...]
    deadline_at: datetime | None
    last_error: str | None = None


def initial_state() -> RouterState:
    """The empty state."""
    return RouterState()


def attempt_key(request_id: str, attempt: int) -> str:
    """The memory key of one routing decision."""
    return f"{request_id}#{attempt}"


def stage(attempt: int) -> str:
    """The event-id stage of an attempt: the first keeps the name it always had, so ids stay stable."""
    return STAGE if attempt == 1 else f"{STAGE}-{attempt}"


def evolve(state: RouterState, event: Event, now: datetime | None = None) -> RouterState:
    """A route remembers its attempt (and, while in flight, itself); a failed attempt counts against
    its endpoint's breaker. `now`: the folding router's clock (see `Routes.add`)."""
    match event:
        case RouteSelected():
            if attempt_key(event.request_id, event.attempt) in state.routed:
                return state  # read again (its own decision, then from the stream): folded once
            routed = state.routed.add(attempt_key(event.request_id, event.attempt), event.occurred_at)
            return msgspec.structs.replace(state, routed=routed, routes=state.routes.add(event, now))
        case RouteUnavailable():
            # the request ended: its next attempt's key is taken, so no failure is routed on again
            routed = state.routed.add(attempt_key(event.request_id, _ended(event)), event.occurred_at)
            return msgspec.structs.replace(state, routed=routed)
        case InvocationCompleted():
            # learned only from the outcome of a route this router recorded, once: a completion
            # forged for no route (or read again after a reader restart) moves no figure
            route = state.routes.get(event.request_id, event.occurred_at)
            seen = state.latency.get(event.endpoint)
            if route is None or (route.attempt, route.endpoint) != (event.attempt, event.endpoint) or (
                    seen is not None and event.event_id in seen.recent):
                return state
            took = min(MAX_LATENCY_MS, max(0.0, event.latency_ms))
            ms = took if seen is None else seen.ms + LATENCY_WEIGHT * (took - seen.ms)
            observed = Observed(ms=round(ms, 3), completions=1 if seen is None else seen.completions + 1,
                                recent=(*(seen.recent if seen else ()), event.event_id)[-LATENCY_RECENT:])
            return msgspec.structs.replace(state, latency={**state.latency, event.endpoint: observed})
        case InvocationFailed():
            old = state.breakers.get(event.endpoint, Breaker())
            if any(eid == event.event_id for _, eid in old.failures):
                return state  # a copy of a failure counts once
            kept = Breaker(failures=(*old.failures, (event.occurred_at, event.event_id))[-KEPT_FAILURES:])
            return msgspec.structs.replace(state, breakers={**state.breakers, event.endpoint: kept})
        case _:
            return state


def _ended(event: RouteUnavailable) -> int:
    # a RouteUnavailable ends the attempt after the last one tried; its id names that attempt
    tail = event.event_id.rsplit(":", 1)[-1]
    return int(tail.removeprefix(f"{STAGE}-")) if tail.startswith(f"{STAGE}-") else 1


def unknown_attempt(event: InvocationFailed, state: RouterState, now: datetime) -> bool:
    """A failure of an attempt this router has no route for (yet, or ever): not to be routed again.
    One stored past its deadline and ROUTE_GRACE is not waited for: its request is over."""
    if event.final or attempt_key(event.request_id, event.attempt + 1) in state.routed:
        return False
    if event.deadline_at is not None and event.deadline_at + ROUTE_GRACE < now:
        return False
    route = state.routes.get(event.request_id, now)
    return route is None or (route.attempt, route.endpoint) != (event.attempt, event.endpoint)


def decide(event: RouterInput, state: RouterState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    """One RouteSelected or RouteUnavailable per attempt (none if decided before, or for a final failure)."""
    if isinstance(event, InvocationFailed) and (
            event.final or attempt_key(event.request_id, event.attempt + 1) in state.routed):
        return []
    ask = _ask(event, state, now)
    if ask is None or attempt_key(ask.request_id, ask.attempt) in state.routed:
        return []
    env = envelope(ask.request_id, stage(ask.attempt), now, policy.version)
    if ask.last_error == STREAM_BROKEN:  # the caller may have part of an answer: another start would garble it
        return [_unavailable(env, ask, "invocation_failed", f"the streamed attempt at {ask.tried[-1]} was "
                             "delivered again, so its tokens may have reached the caller already; no other "
                             "attempt is started")]
    if policy.catalog.routing.end_on_refusal and (  # the caller's to fix: another endpoint would refuse it too
            ask.last_error == CONTEXT_EXCEEDED or ask.last_error in REFUSED_AS_MALFORMED):
        return [_unavailable(env, ask, CONTEXT_EXCEEDED if ask.last_error == CONTEXT_EXCEEDED else "invalid_request",
                             f"the model server at {ask.tried[-1]} refused the request ({ask.last_error}); "
                             "another endpoint of the same model would too")]
    if ask.deadline_at is not None and now >= ask.deadline_at:  # the caller stopped waiting: end it
        return [_unavailable(env, ask, "timeout", f"the request's deadline {ask.deadline_at.isoformat()} passed "
                                                  f"before attempt {ask.attempt}")]
    resolved = catalog.resolve(policy.catalog, ask.model_id)
    strategy = ask.chat.strategy or (resolved.model.strategy if resolved is not None else "ordered")
    if resolved is not None and strategy not in (resolved.model.strategy, *resolved.model.strategies_allowed):
        allowed = ", ".join(dict.fromkeys((resolved.model.strategy, *resolved.model.strategies_allowed)))
        return [_unavailable(env, ask, "strategy_not_allowed", f"requests for {resolved.model.id!r} may not ask "
                             f"for routing strategy {strategy!r}; the catalog allows: {allowed}")]
    again, blocked = _retry(ask, state, policy, now)
    if resolved is not None and again is not None:
        return [_selected(env, ask, resolved.model.id, ask.tried[-1], (), again, policy,
                          Ranking(strategy=strategy, candidates=(ask.tried[-1],)))]
    left = [] if resolved is None else [e for e in catalog.endpoints_of(resolved.model) if e not in ask.tried]
    if resolved is None or not left:
        why = (f"every endpoint of {ask.model_id!r} failed: {', '.join(ask.tried)}" if ask.tried
               else f"no active endpoint serves {ask.model_id!r}")
        # the caller hears what it always heard: the model server failed (502), or no server (503);
        # a retry its circuit stopped is recorded, the figure replay decides it on
        return [_unavailable(env, ask, "invocation_failed" if ask.tried else "route_unavailable", why, blocked)]
    ranking = rank(strategy, left, resolved.model, ask.request_id, state, first=not ask.tried)
    ranked = list(ranking.candidates)
    avoided = tuple(e for e in ranked if circuit_open(state.breakers.get(e), policy, now))
    chosen = next((e for e in ranked if e not in avoided and e not in state.unserved), None) or next(
        (e for e in ranked if e not in avoided), ranked[0])  # none served and closed: the first one probes
    skipped = (*(Skipped(e, "failed_before") for e in dict.fromkeys(ask.tried)),
               *(Skipped(e, "circuit_open" if e in avoided else "no_invoker") for e in ranked[:ranked.index(chosen)]))
    # a retry its circuit stopped is recorded too: the figures replay decides it again on
    return [_selected(env, ask, resolved.model.id, chosen, (*blocked, *avoided), None, policy,
                      msgspec.structs.replace(ranking, skipped=skipped))]


class Ranking(Struct, frozen=True, kw_only=True):
    """How a decision ranked the endpoints: what RouteSelected v3 records of it."""

    strategy: str
    candidates: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()
    observed_ms: tuple[tuple[str, float], ...] = ()


def rank(strategy: str, endpoints: list[str], model: ModelEntry, request_id: str, state: RouterState,
         first: bool) -> Ranking:
    """The endpoints in the order the strategy tries them (sorts are stable: ties keep catalog order).

    "weighted" draws only a first attempt (a fallback takes catalog order); "latency" puts the
    fastest observed first and records the figures it ranked by; endpoints never observed come last
    (one no invoker hosts would otherwise draw every request), and are measured when tried."""
    match strategy:
        case "weighted" if first:
            ranked = _weighted(endpoints, model, request_id)
        case "cheapest":
            cost = dict(zip(catalog.endpoints_of(model), model.costs, strict=True))
            ranked = sorted(endpoints, key=lambda e: cost[e])
        case "latency":
            ranked = sorted(endpoints, key=lambda e: (e not in state.latency,
                                                      state.latency[e].ms if e in state.latency else 0.0))
            return Ranking(strategy=strategy, candidates=tuple(ranked),
                           observed_ms=tuple((e, state.latency[e].ms) for e in ranked if e in state.latency))
        case _:
            ranked = endpoints
    return Ranking(strategy=strategy, candidates=tuple(ranked))


def _unavailable(env: Envelope, ask: _Ask, reason: str, detail: str,
                 circuit_open: tuple[str, ...] = ()) -> RouteUnavailable:
    return RouteUnavailable(**env, caller=ask.caller, requested_model=ask.requested_model, reason=reason,
                            reservation=ask.reservation, reply_to=ask.reply_to, detail=detail,
                            circuit_open=circuit_open)


def _selected(env: Envelope, ask: _Ask, model_id: str, endpoint: str, avoided: tuple[str, ...],
              not_before: datetime | None, policy: PolicyBundle, ranking: Ranking) -> RouteSelected:
    return RouteSelected(
        **env,
        caller=ask.caller,
        requested_model=ask.requested_model,
        model_id=model_id,
        endpoint=endpoint,
        substituted_from=ask.requested_model if ask.requested_model != model_id else None,
        max_tokens=ask.max_tokens,
        chat=ask.chat,
        reservation=ask.reservation,
        reply_to=ask.reply_to,
        attempt=ask.attempt,
        tried=ask.tried,
        circuit_open=avoided,
        deadline_at=ask.deadline_at,
        not_before=not_before,
        strategy=ranking.strategy,
        candidates=ranking.candidates,
        skipped=ranking.skipped,
        observed_ms=ranking.observed_ms,
        substitution=catalog.substitution(policy.catalog, ask.requested_model, model_id),
        protocol=served.protocol if (served := catalog.find(policy.catalog, model_id)) is not None else "openai",
    )


def _weighted(endpoints: list[str], model: ModelEntry, request_id: str) -> list[str]:
    """The endpoints with one drawn first in proportion to its weight, the rest in catalog order; the
    draw comes from the request id, so every replica and replay pick the same."""
    weight = dict(zip(catalog.endpoints_of(model), model.weights, strict=True))
    total = sum(weight[e] for e in endpoints)
    point = int(hashlib.sha256(f"{request_id}#weighted".encode()).hexdigest()[:12], 16) % total
    for e in endpoints:
        point -= weight[e]
        if point < 0:
            return [e, *(o for o in endpoints if o != e)]
    return endpoints


def retryable(error: str | None) -> bool:
    """A failure that may pass if tried again: a timeout, a refused or reset connection, a 5xx or 429."""
    return error in ("timeout", "unreachable", "http_429") or bool(error and error.startswith("http_5"))


def backoff(request_id: str, attempt: int, retry: int, policy: PolicyBundle) -> timedelta:
    """The wait before a request's `retry`-th retry: exponential, with a jitter derived from the
    request and attempt (spread like random, the same on every replica and in replay)."""
    jitter = int(hashlib.sha256(f"{request_id}#{attempt}".encode()).hexdigest()[:8], 16) / 2**32
    base = policy.catalog.routing.retry_backoff_ms * 2 ** (retry - 1)
    return timedelta(milliseconds=base * (0.5 + jitter))


def _retry(ask: _Ask, state: RouterState, policy: PolicyBundle, now: datetime
           ) -> tuple[datetime | None, tuple[str, ...]]:
    """When to try the failed endpoint again, or None: move on (not retryable, retries used up,
    its circuit open, or the backoff would end past the deadline); and the endpoint whose open
    circuit stopped a retry, if one did."""
    if not ask.tried or not retryable(ask.last_error):
        return None, ()
    endpoint = ask.tried[-1]
    retry = ask.tried.count(endpoint)
    if retry > policy.catalog.routing.retries_per_endpoint:
        return None, ()
    if circuit_open(state.breakers.get(endpoint), policy, now):
        return None, (endpoint,)
    when = now + backoff(ask.request_id, ask.attempt, retry, policy)
    return (None if ask.deadline_at is not None and when >= ask.deadline_at else when), ()


def _ask(event: RouterInput, state: RouterState, now: datetime) -> _Ask | None:
    match event:
        case BudgetReserved():
            held = Reservation(team=event.team, period=event.period, micros=event.amount_micros)
            return _Ask(request_id=event.request_id, caller=event.caller, requested_model=event.chat.model,
                        model_id=event.model_id, max_tokens=event.max_tokens, chat=event.chat, reservation=held,
                        reply_to=event.reply_to, attempt=1, tried=(), deadline_at=event.deadline_at)
        case InvocationFailed():
            route = state.routes.get(event.request_id, now)
            if event.final or route is None or (route.attempt, route.endpoint) != (event.attempt, event.endpoint):
                return None  # ended with it (v1), or not a route of ours: nothing to route
            return _Ask(request_id=route.request_id, caller=route.caller, requested_model=route.requested_model,
                        model_id=route.model_id, max_tokens=route.max_tokens, chat=route.chat,
                        reservation=route.reservation, reply_to=route.reply_to, attempt=route.attempt + 1,
                        tried=(*route.tried, route.endpoint), deadline_at=route.deadline_at,
                        last_error=event.error)
