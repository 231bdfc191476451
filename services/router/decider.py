"""Router decider: pick the model and endpoint for a funded request, and the next one when an
attempt fails (DESIGN §5, issue 10).

A circuit breaker per endpoint is folded from invocation outcomes: `breaker_failures` consecutive
failures open it, and an open endpoint is passed over while another is left, until
`breaker_cooldown_s` after its latest failure, when one attempt may probe it (half-open); a success
closes it. Time is the decision's `now`, never a clock read here. When every endpoint left is
open, the first is tried anyway: a breaker reorders, it never fails a request by itself. No
attempt starts after the request's deadline: the request ends with RouteUnavailable(timeout).

The catalog resolves aliases and deprecated names to what actually runs; `RouteSelected`
records the substitution so a rename needs a catalog change and nothing else. A model's endpoints
are tried in catalog order: a failed attempt (`InvocationFailed`, not final) is routed again to
the next endpoint not yet tried, from the event alone, so every fallback is a recorded decision
that replay re-makes; when none is left the request ends with `RouteUnavailable`, which releases
its reservation and answers the caller.
"""

from datetime import datetime, timedelta

from msgspec import Struct

from ...schemas.commands import ChatBody
from ...schemas.events import (
    AnyEvent,
    BudgetReserved,
    Caller,
    Event,
    InvocationCompleted,
    InvocationFailed,
    Reservation,
    RouteSelected,
    RouteUnavailable,
    envelope,
)
from ...schemas.policy import PolicyBundle
from .. import catalog
from ..remembered import Remembered

STAGE = "route"
RouterInput = BudgetReserved | InvocationFailed


class Breaker(Struct, frozen=True, kw_only=True):
    """An endpoint's recent record: consecutive failed attempts, and when the latest failed."""

    failures: int = 0
    last_failed_at: datetime | None = None


class RouterState(Struct, frozen=True, kw_only=True):
    """The attempts already routed, as `request_id#attempt` (idempotency), and each endpoint's breaker."""

    routed: Remembered = Remembered()
    breakers: dict[str, Breaker] = {}


def circuit_open(breaker: Breaker | None, policy: PolicyBundle, now: datetime) -> bool:
    """Whether requests avoid the endpoint now (open); after the cooldown one may probe it (half-open)."""
    if breaker is None or breaker.last_failed_at is None:
        return False
    routing = policy.catalog.routing
    return breaker.failures >= routing.breaker_failures and now < breaker.last_failed_at + timedelta(
        seconds=routing.breaker_cooldown_s)


def as_recorded(route: RouteSelected, policy: PolicyBundle) -> RouterState:
    """The breakers a route says were open when it was decided: what replay decides it again on."""
    opened = Breaker(failures=policy.catalog.routing.breaker_failures, last_failed_at=route.occurred_at)
    return RouterState(breakers={e: opened for e in route.circuit_open})


class _Ask(Struct, frozen=True, kw_only=True):
    """What routing needs of a request, from its reservation or from a failed attempt."""

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


def initial_state() -> RouterState:
    """The empty state."""
    return RouterState()


def attempt_key(request_id: str, attempt: int) -> str:
    """The memory key of one routing decision."""
    return f"{request_id}#{attempt}"


def stage(attempt: int) -> str:
    """The event-id stage of an attempt: the first keeps the name it always had, so ids stay stable."""
    return STAGE if attempt == 1 else f"{STAGE}-{attempt}"


def evolve(state: RouterState, event: Event) -> RouterState:
    """A route of this stage remembers its attempt; an invocation outcome moves its endpoint's breaker."""
    match event:
        case RouteSelected():
            routed = state.routed.add(attempt_key(event.request_id, event.attempt), event.occurred_at)
            return RouterState(routed=routed, breakers=state.breakers)
        case RouteUnavailable():
            routed = state.routed.add(attempt_key(event.request_id, _ended(event)), event.occurred_at)
            return RouterState(routed=routed, breakers=state.breakers)
        case InvocationCompleted():
            return RouterState(routed=state.routed, breakers={**state.breakers, event.endpoint: Breaker()})
        case InvocationFailed():
            old = state.breakers.get(event.endpoint, Breaker())
            now_failing = Breaker(failures=old.failures + 1, last_failed_at=event.occurred_at)
            return RouterState(routed=state.routed, breakers={**state.breakers, event.endpoint: now_failing})
        case _:
            return state


def _ended(event: RouteUnavailable) -> int:
    # a RouteUnavailable ends the attempt after the last one tried; its id names that attempt
    tail = event.event_id.rsplit(":", 1)[-1]
    return int(tail.removeprefix(f"{STAGE}-")) if tail.startswith(f"{STAGE}-") else 1


def decide(event: RouterInput, state: RouterState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    """One RouteSelected or RouteUnavailable per attempt (none if decided before, or for a final failure)."""
    ask = _ask(event)
    if ask is None or attempt_key(ask.request_id, ask.attempt) in state.routed:
        return []
    env = envelope(ask.request_id, stage(ask.attempt), now, policy.version)
    if ask.deadline_at is not None and now >= ask.deadline_at:  # the caller stopped waiting: end it
        return [
            RouteUnavailable(
                **env,
                caller=ask.caller,
                requested_model=ask.requested_model,
                reason="timeout",
                reservation=ask.reservation,
                reply_to=ask.reply_to,
                detail=f"the request's deadline {ask.deadline_at.isoformat()} passed before attempt {ask.attempt}",
            )
        ]
    resolved = catalog.resolve(policy.catalog, ask.model_id)
    left = [] if resolved is None else [e for e in catalog.endpoints_of(resolved.model) if e not in ask.tried]
    if resolved is None or not left:
        why = (f"every endpoint of {ask.model_id!r} failed: {', '.join(ask.tried)}" if ask.tried
               else f"no active endpoint serves {ask.model_id!r}")
        return [
            RouteUnavailable(
                **env,
                caller=ask.caller,
                requested_model=ask.requested_model,
                # the caller hears what it always heard: the model server failed (502), or no server (503)
                reason="invocation_failed" if ask.tried else "route_unavailable",
                reservation=ask.reservation,
                reply_to=ask.reply_to,
                detail=why,
            )
        ]
    model = resolved.model
    avoided = tuple(e for e in left if circuit_open(state.breakers.get(e), policy, now))
    chosen = next((e for e in left if e not in avoided), left[0])  # all open: the first one probes
    return [
        RouteSelected(
            **env,
            caller=ask.caller,
            requested_model=ask.requested_model,
            model_id=model.id,
            endpoint=chosen,
            substituted_from=ask.requested_model if ask.requested_model != model.id else None,
            max_tokens=ask.max_tokens,
            chat=ask.chat,
            reservation=ask.reservation,
            reply_to=ask.reply_to,
            attempt=ask.attempt,
            tried=ask.tried,
            circuit_open=avoided,
            deadline_at=ask.deadline_at,
        )
    ]


def _ask(event: RouterInput) -> _Ask | None:
    match event:
        case BudgetReserved():
            held = Reservation(team=event.team, period=event.period, micros=event.amount_micros)
            return _Ask(request_id=event.request_id, caller=event.caller, requested_model=event.chat.model,
                        model_id=event.model_id, max_tokens=event.max_tokens, chat=event.chat, reservation=held,
                        reply_to=event.reply_to, attempt=1, tried=(), deadline_at=event.deadline_at)
        case InvocationFailed():
            if event.final or event.chat is None:
                return None  # the request ended with it (v1), or it cannot be routed again
            return _Ask(request_id=event.request_id, caller=event.caller, requested_model=event.requested_model,
                        model_id=event.model_id, max_tokens=event.max_tokens, chat=event.chat,
                        reservation=event.reservation, reply_to=event.reply_to, attempt=event.attempt + 1,
                        tried=(*event.tried, event.endpoint), deadline_at=event.deadline_at)
