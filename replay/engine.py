"""Replay (DESIGN §6, issue 9 item 5, in part): re-run every recorded decision with the policy it
was made under and compare it with what was recorded. Pure over a sequence of stored messages:
no bus, no clock; the same deciders the services run (STYLE §1).

Re-decided today:
- authz: each `RequestAuthorized` / `RequestDenied` from its `RequestSubmitted`, at its recorded time;
- router: each `RouteSelected` / `RouteUnavailable` from its `BudgetReserved`;
- budget: each reservation, settlement, release and refusal from its input, against the projection
  folded from every ledger fact stored before it (the compare-and-set guarantees the writer saw
  exactly those).
The invoker's outcome is an observation (recorded, not re-decided), and so are the edge's delivery
facts. Expiries are decided by the budget's clock, not by an input event, so they are checked for
consistency (the reservation was open and old enough) rather than re-decided: issue 9 item 1.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import msgspec

from ..schemas import codec
from ..schemas.events import (
    AnyEvent,
    BudgetClockTicked,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    EndpointObserved,
    InvocationCompleted,
    InvocationFailed,
    PolicyActivated,
    RateCount,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    RouteSelected,
    RouteUnavailable,
)
from ..schemas.policy import PolicyBundle
from ..services.authz import decider as authz
from ..services.authz.decider import AuthzPolicy
from ..services.authz.policy_view import compile_view
from ..services.budget import decider as budget
from ..services.budget import rates
from ..services.policy import PolicyError, bundle_from_files, verify_activation
from ..services.router import decider as router

Stored = tuple[int, str, bytes]  # stream sequence, subject, exact bytes


class Mismatch(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded decision that replay did not reproduce."""

    seq: int
    request_id: str
    decision: str  # the recorded event's type
    why: str
    recorded: str  # the recorded event, JSON
    replayed: str  # what the decider decided now, JSON ("" when it could not run)


class Result(msgspec.Struct, kw_only=True):
    """What replay checked."""

    decisions: int = 0
    reproduced: int = 0
    observations: int = 0  # recorded, not re-decided (the invoker's outcome, deliveries)
    mismatches: list[Mismatch] = msgspec.field(default_factory=list)
    policies_refused: list[str] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every decision reproduced."""
        return not self.mismatches


class _Policies:
    """Recorded policies by version, compiled on first use."""

    def __init__(self, extra_jwks: list[str], trusted: dict[str, str] | None) -> None:
        self.extra_jwks, self.trusted = extra_jwks, trusted
        self.bundles: dict[str, PolicyBundle] = {}
        self.views: dict[str, AuthzPolicy] = {}
        self.refused: dict[str, str] = {}
        self.seqs: dict[str, int] = {}  # where each input was stored, by event id (its first copy)
        self.ticks: dict[str, BudgetClockTicked] = {}  # the budget's clock ticks, by event id
        self.failures: dict[str, InvocationFailed] = {}  # failed attempts, routed again, by event id
        self.routes: dict[str, RouteSelected] = {}  # every route, by event id: what a failure was an attempt of
        self.breakers = router.initial_state()  # failed attempts stored so far: what backs a circuit_open claim
        self.dev_jwks: dict[str, str] = {}
        self.older: dict[int, int] = {}  # seq -> the version an event was stored at, when older than current
        self.deadline_ends: set[tuple[str, str]] = set()  # (request, tick) of each release at a deadline
        # the lowest and highest latency of each endpoint's completions so far, each of a recorded
        # route: a moving average a route ranked by must lie between them
        self.latencies: dict[str, tuple[float, float]] = {}
        self.watched: dict[tuple[str, str], bool] = {}  # (endpoint, router replica) -> served, its latest view
        # every admitted request's reading of each requests counter (by counter): what they all claim
        # must be possible together (`_impossible_readings`)
        self.readings: dict[str, list[tuple[int, int, BudgetReserved]]] = {}

    def observe(self, done: InvocationCompleted) -> None:
        route = self.routes.get(done.causation_id or "")
        if route is None or (route.request_id, route.endpoint) != (done.request_id, done.endpoint):
            return
        ms = min(router.MAX_LATENCY_MS, max(0.0, done.latency_ms))
        low, high = self.latencies.get(done.endpoint, (ms, ms))
        self.latencies[done.endpoint] = (min(low, ms), max(high, ms))

    def record(self, event: PolicyActivated) -> None:
        try:
            bundle = bundle_from_files(event.files)
        except PolicyError as exc:
            self.refused[event.version] = str(exc)
            return
        if bundle.version != event.version:  # the recorded content is not what that version names
            self.refused[event.version] = f"its content is {bundle.version}, not {event.version}"
            return
        self.bundles.setdefault(event.version, bundle)
        if event.dev_issuers_jwks and self._signed(event):  # tokens then verify from the stream alone
            self.dev_jwks.setdefault(event.version, event.dev_issuers_jwks)

    def _signed(self, event: PolicyActivated) -> bool:
        """Only keys a pinned policy signer vouched for are taken (when replay knows the pins)."""
        if self.trusted is None:
            return True
        try:
            verify_activation(event, self.trusted)
        except PolicyError:
            return False
        return True

    def bundle(self, version: str) -> PolicyBundle:
        if version not in self.bundles:
            raise PolicyError(self.refused.get(version, f"policy {version} is not in the replayed stream"))
        return self.bundles[version]

    def authz(self, version: str) -> AuthzPolicy:
        if version not in self.views:
            carried = [self.dev_jwks[version]] if version in self.dev_jwks else []
            self.views[version] = compile_view(self.bundle(version), [*carried, *self.extra_jwks])
        return self.views[version]


def replay(stored: Iterable[Stored], extra_jwks: list[str] | None = None, first: int = 0, last: int | None = None,
           progress: Callable[[int], None] | None = None, trusted: dict[str, str] | None = None) -> Result:
    """Re-decide every decision in `stored` (stream order) stored at sequences `first..last`.

    The budget's projection is folded from the very first message whatever the range, so a
    decision is re-made on exactly the state it was made on. Mismatches name the decision and why.
    """
    decoded: list[tuple[int, AnyEvent | None]] = []
    older: dict[int, int] = {}
    for seq, subject, data in stored:  # once: it is most of the cost
        event, version = _decode(subject, data)
        decoded.append((seq, event))
        if event is not None and version != event.schema_version:
            older[seq] = version
    return replay_decoded(decoded, extra_jwks, first, last, progress, trusted, older)


def replay_decoded(decoded: list[tuple[int, AnyEvent | None]], extra_jwks: list[str] | None = None, first: int = 0,
                   last: int | None = None, progress: Callable[[int], None] | None = None,
                   trusted: dict[str, str] | None = None, older: dict[int, int] | None = None) -> Result:
    """`replay` of messages already decoded (None: bytes that are no event), so a verifier decodes once;
    `older` gives the version of each one stored at an older version than its type's current."""
    with frozen_for_the_collector():
        return _replay(decoded, extra_jwks, first, last, progress, trusted, older or {})


@contextlib.contextmanager
def frozen_for_the_collector() -> Iterator[None]:
    """Python's cycle collector rescans every live container on its full passes, and a replay holds a
    million acyclic events: those passes were a sixth of its time. What is alive when it starts is
    set aside for its duration (`gc.freeze`); cycles made meanwhile are still collected."""
    if gc.get_freeze_count():  # someone else froze the heap (or an outer replay did): leave it to them
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _replay(decoded: list[tuple[int, AnyEvent | None]], extra_jwks: list[str] | None, first: int,
            last: int | None, progress: Callable[[int], None] | None, trusted: dict[str, str] | None,
            older: dict[int, int]) -> Result:
    result, policies = Result(), _Policies(extra_jwks or [], trusted)
    policies.older = older
    inputs: dict[tuple[str, str], AnyEvent] = {}
    for seq, event in decoded:  # first pass: policies and the inputs decisions are made from
        if isinstance(event, PolicyActivated):
            policies.record(event)
        elif event is not None:
            inputs[(type(event).__name__, event.request_id)] = event
            policies.seqs.setdefault(event.event_id, seq)
            if isinstance(event, BudgetClockTicked):
                policies.ticks.setdefault(event.event_id, event)
            elif isinstance(event, InvocationFailed):
                policies.failures.setdefault(event.event_id, event)
            elif isinstance(event, RouteSelected):
                policies.routes.setdefault(event.event_id, event)
            elif isinstance(event, BudgetReleased) and event.reason == "deadline" and event.causation_id:
                policies.deadline_ends.add((event.request_id, event.causation_id))
    result.policies_refused = [f"{v}: {why}" for v, why in sorted(policies.refused.items())]
    state = budget.initial_state()
    for n, (seq, event) in enumerate(decoded):
        if event is not None:
            if first <= seq and (last is None or seq <= last):
                _check(seq, event, inputs, state, policies, result)
            if isinstance(event, budget.FOLDED):  # budget.evolve returns any other event's state unchanged
                state = budget.evolve(state, event)
            elif isinstance(event, InvocationFailed):
                policies.breakers = router.evolve(policies.breakers, event)
            elif isinstance(event, InvocationCompleted):
                policies.observe(event)
            elif isinstance(event, EndpointObserved):
                policies.watched[(event.endpoint, event.replica)] = event.served
        if progress is not None and n % 1000 == 0:
            progress(n)
    _impossible_readings(policies, result)
    return result


def _decode(subject: str, data: bytes) -> tuple[AnyEvent | None, int]:
    try:
        return codec.decode_event_versioned(data, subject)
    except codec.DecodeError:
        return None, 0  # junk and misplaced bytes decide nothing and were decided by nothing


def _check(seq: int, event: AnyEvent, inputs: dict[tuple[str, str], AnyEvent], state: budget.BudgetState,
           policies: _Policies, result: Result) -> None:
    rid = event.request_id
    match event:
        case RequestAuthorized() | RequestDenied():
            source = inputs.get(("RequestSubmitted", rid))
            if isinstance(source, RequestSubmitted):
                _compare(seq, event, result, source, policies, lambda: authz.decide(
                    source, authz.initial_state(), policies.authz(event.policy_version), event.occurred_at))
            elif isinstance(event, RequestAuthorized):
                _mismatch(result, seq, event, "no RequestSubmitted it could have been decided from", "")
        case RouteSelected() | RouteUnavailable():
            reserved = inputs.get(("BudgetReserved", rid))
            failure = policies.failures.get(event.causation_id or "")
            unbacked = _unbacked_claims(event, policies)
            if unbacked:
                _mismatch(result, seq, event, unbacked, "")
            elif failure is not None:  # a fallback: decided from the route of the failed attempt
                previous = policies.routes.get(failure.causation_id or "")
                if previous is None or previous.request_id != rid:
                    _mismatch(result, seq, event, f"decided from {failure.event_id}, a failure of no recorded route "
                                                  "of this request", "")
                else:
                    _compare(seq, event, result, failure, policies, lambda: router.decide(
                        failure, _router_state(event, policies, previous), policies.bundle(event.policy_version),
                        event.occurred_at))
            elif isinstance(event, RouteSelected) and event.attempt > 1:
                _mismatch(result, seq, event, "a fallback that names no failed attempt it was decided from", "")
            elif isinstance(reserved, BudgetReserved):
                _compare(seq, event, result, reserved, policies, lambda: router.decide(
                    reserved, _router_state(event, policies), policies.bundle(event.policy_version),
                    event.occurred_at))
            else:
                _mismatch(result, seq, event, "no BudgetReserved it could have been decided from", "")
        case BudgetReserved() | BudgetRejected() | BudgetSettled() | BudgetThresholdCrossed():
            _check_budget(seq, event, inputs, state, policies, result)
        case BudgetReleased():
            tick = policies.ticks.get(event.causation_id or "")
            if event.reason in ("expired", "deadline") and isinstance(tick, BudgetClockTicked):  # the timer is an input
                _compare(seq, event, result, tick, policies, lambda: budget.decide(
                    tick, state, policies.bundle(event.policy_version), event.occurred_at))
            elif event.reason == "expired":  # recorded before expiry was decided from a tick
                _check_expiry(seq, event, state, policies, result)
            else:
                _check_budget(seq, event, inputs, state, policies, result)
        case RequestFailed() if event.stage == "budget":
            # the budget ends a request at its deadline with two facts from one tick: the release,
            # re-decided at its own place, and this answer to the caller, which must be its twin
            result.decisions += 1
            if (rid, event.causation_id or "") in policies.deadline_ends:
                result.reproduced += 1
            else:
                _mismatch(result, seq, event, "the budget ends a request only with a deadline release decided "
                                              "from the same tick, and there is none", "", counted=True)
        case _:
            result.observations += 1


def _router_state(event: RouteSelected | RouteUnavailable, policies: _Policies,
                  previous: RouteSelected | None = None) -> router.RouterState:
    """The breakers the decision recorded as open and its latency figures, and the failed attempt's route."""
    return router.as_recorded(event, policies.bundle(event.policy_version), previous)


def _unbacked_claims(event: RouteSelected | RouteUnavailable, policies: _Policies) -> str:
    """Why a route's open circuits, or the latency figures it ranked by, are not what the outcomes
    stored before it say ("" when they are)."""
    for skip in event.skipped if isinstance(event, RouteSelected) else ():
        if skip.reason == "no_invoker" and not any(
                endpoint == skip.endpoint and not served for (endpoint, _), served in policies.watched.items()):
            return (f"it passes over {skip.endpoint} as served by no invoker, but no router's view stored before "
                    "it says so")
    for endpoint, ms in event.observed_ms if isinstance(event, RouteSelected) else ():
        low, high = policies.latencies.get(endpoint, (math.inf, -math.inf))
        if not low - 0.001 <= ms <= high + 0.001:
            return (f"it ranks {endpoint} at {ms} ms, outside the latencies of its completions stored before it "
                    f"({'none' if low > high else f'{low}-{high} ms'})")
    if not event.circuit_open:
        return ""
    try:
        bundle = policies.bundle(event.policy_version)
    except PolicyError:
        return ""  # named by the comparison that follows
    for endpoint in event.circuit_open:
        breaker = policies.breakers.breakers.get(endpoint)
        if not router.circuit_open(breaker, bundle, event.occurred_at):
            return (f"it passes over {endpoint} as open, but the stream holds "
                    f"{router.failures_within(breaker, bundle, event.occurred_at)} of its failures in the window, "
                    f"fewer than {bundle.catalog.routing.breaker_failures}")
    return ""


_BUDGET_INPUT: dict[str, tuple[str, ...]] = {
    "BudgetReserved": ("RequestAuthorized",),
    "BudgetRejected": ("RequestAuthorized",),
    "BudgetSettled": ("InvocationCompleted",),
    "BudgetReleased": ("InvocationFailed", "RouteUnavailable", "RequestFailed"),
}


def _check_budget(seq: int, event: AnyEvent, inputs: dict[tuple[str, str], AnyEvent], state: budget.BudgetState,
                  policies: _Policies, result: Result) -> None:
    if isinstance(event, BudgetThresholdCrossed):
        result.observations += 1  # announced with the decision that crossed it: checked there
        return
    names = (str(event.reason),) if isinstance(event, BudgetReleased) else _BUDGET_INPUT[type(event).__name__]
    source = next((inputs[(n, event.request_id)] for n in names if (n, event.request_id) in inputs), None)
    if not isinstance(source, RequestAuthorized | InvocationCompleted | InvocationFailed | RouteUnavailable |
                      RequestFailed):
        _mismatch(result, seq, event, f"no {' or '.join(names)} it could have been decided from", "")
        return
    # the rate counters' readings are observations the decision recorded (as routing's latencies):
    # replay decides from them, once they are the counts the policy calls for, and checks what they
    # read against each other once the stream is read (`_impossible_readings`)
    observed = event.rates if isinstance(event, BudgetReserved | BudgetRejected) else ()
    if isinstance(event, BudgetReserved | BudgetRejected) and isinstance(source, RequestAuthorized):
        wrong = _rate_claims(event, source, policies)
        if wrong:
            _mismatch(result, seq, event, wrong, "")
            return
        if isinstance(event, BudgetReserved):
            for count in event.rates:
                if count.kind == "requests":
                    policies.readings.setdefault(rates.subject(count), []).append((count.observed, seq, event))
    _compare(seq, event, result, source, policies, lambda: budget.decide(
        source, state, policies.bundle(event.policy_version), event.occurred_at, observed))


def _rate_claims(event: BudgetReserved | BudgetRejected, source: RequestAuthorized, policies: _Policies) -> str:
    """Why the rate counts a decision records are not those its policy calls for ('' when they are):
    every limit that names the request, in order, each of its minute, amount and limit, up to and
    including the first over its limit (where counting stops)."""
    try:
        bundle = policies.bundle(event.policy_version)
    except PolicyError:
        return ""  # said by the decision's own comparison
    want = rates.to_count(source, bundle, event.occurred_at, budget.token_bound(source, bundle))
    got = event.rates

    def shape(c: RateCount) -> tuple[str, str, str, str, int, int]:
        return c.scope, c.key, c.kind, c.window, c.counted, c.limit

    if [shape(c) for c in got] != [shape(c) for c in want[:len(got)]]:
        return (f"its rate counts {[shape(c) for c in got]} are not the ones its policy calls for "
                f"{[shape(c) for c in want]}")
    if len(got) < len(want) and not (got and rates.over(got[-1])):
        return f"it records {len(got)} of the {len(want)} rate counts its policy calls for, and none refused it"
    return ""


def _impossible_readings(policies: _Policies, result: Result) -> None:
    """Admitted requests' readings of one requests counter that cannot all be true. An admitted count
    is never given back, so the admitted requests reading at most r are at most r: sorted, the i-th
    reading is at least i. Two admitted requests that both read 1 is a forged record."""
    for subject, readings in policies.readings.items():
        for i, (observed, seq, event) in enumerate(sorted(readings, key=lambda r: (r[0], r[1])), 1):
            if observed < i:
                _mismatch(result, seq, event, f"it read {observed} on {subject}, where {i} admitted requests "
                                              f"read {observed} or less: counts that cannot all be true", "",
                          counted=True)
                break


def _check_expiry(seq: int, event: BudgetReleased, state: budget.BudgetState, policies: _Policies,
                  result: Result) -> None:
    result.decisions += 1
    try:
        ttl = policies.bundle(event.policy_version).budgets.reservation_ttl_s
    except PolicyError as exc:
        _mismatch(result, seq, event, str(exc), "", counted=True)
        return
    opened = state.opened_at.get(event.request_id)
    if opened is None or event.occurred_at - opened < timedelta(seconds=ttl):
        _mismatch(result, seq, event, "an expiry of a reservation that was not open, or not yet due", "",
                  counted=True)
        return
    result.reproduced += 1


def _compare(seq: int, event: AnyEvent, result: Result, cause: AnyEvent, policies: _Policies,
             decide: Callable[[], list[AnyEvent]]) -> None:
    result.decisions += 1
    if event.causation_id is not None and (event.causation_id, event.causation_seq) != (
            cause.event_id, policies.seqs.get(cause.event_id)):
        _mismatch(result, seq, event, f"it names its input {event.causation_id} at seq {event.causation_seq}, but "
                                      f"its input is {cause.event_id} at seq {policies.seqs.get(cause.event_id)}",
                  "", counted=True)
        return
    try:
        # the shell stamps the causation, which the decider cannot know: carry the recorded one over
        replayed = [msgspec.structs.replace(r, causation_id=event.causation_id, causation_seq=event.causation_seq)
                    for r in decide()]
        if (version := policies.older.get(seq)) is not None:  # what it would read as, written at that version
            replayed = [codec.as_version(r, version) if type(r) is type(event) else r for r in replayed]
    except PolicyError as exc:
        _mismatch(result, seq, event, f"its policy cannot be replayed: {exc}", "", counted=True)
        return
    # equal structs first (cheap); bytes decide when a decider built a list where the type says tuple
    if any(r == event for r in replayed) or any(codec.encode(r) == codec.encode(event) for r in replayed):
        result.reproduced += 1
        return
    same_type = [r for r in replayed if type(r) is type(event)]
    why = "decided differently" if same_type or replayed else "decided nothing"
    shown = codec.encode(same_type[0] if same_type else replayed[0]).decode() if replayed else ""
    _mismatch(result, seq, event, why, shown, counted=True)


def _mismatch(result: Result, seq: int, event: AnyEvent, why: str, replayed: str, counted: bool = False) -> None:
    if not counted:
        result.decisions += 1
    result.mismatches.append(Mismatch(seq=seq, request_id=event.request_id, decision=type(event).__name__, why=why,
                                      recorded=codec.encode(event).decode(), replayed=replayed))


def diff(m: Mismatch) -> list[tuple[str, str, str]]:
    """(field, recorded, replayed) for each field that differs: the readable part of a mismatch."""
    recorded = msgspec.json.decode(m.recorded)
    replayed = msgspec.json.decode(m.replayed) if m.replayed else {}
    return [(k, str(recorded.get(k)), str(replayed.get(k))) for k in sorted(set(recorded) | set(replayed))
            if recorded.get(k) != replayed.get(k)]
