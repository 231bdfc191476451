"""Router decider: pick the model and endpoint for a funded request (DESIGN §5).

The catalog resolves aliases and deprecated names to what actually runs; `RouteSelected`
records the substitution so a rename needs a catalog change and nothing else.
"""

from datetime import datetime

from msgspec import Struct

from ...schemas.events import AnyEvent, BudgetReserved, Event, Reservation, RouteSelected, RouteUnavailable, envelope
from ...schemas.policy import PolicyBundle
from .. import catalog
from ..remembered import Remembered

STAGE = "route"


class RouterState(Struct, frozen=True, kw_only=True):
    """The requests already routed (idempotency); latency-aware strategies will fold completions."""

    routed: Remembered = Remembered()


def initial_state() -> RouterState:
    """The empty state."""
    return RouterState()


def evolve(state: RouterState, event: Event) -> RouterState:
    """A route of this stage remembers its request."""
    if isinstance(event, RouteSelected | RouteUnavailable):
        return RouterState(routed=state.routed.add(event.request_id, event.occurred_at))
    return state


def decide(event: BudgetReserved, state: RouterState, policy: PolicyBundle, now: datetime) -> list[AnyEvent]:
    """One RouteSelected or RouteUnavailable for a reserved request (none if routed before)."""
    if event.request_id in state.routed:
        return []
    env = envelope(event.request_id, STAGE, now, policy.version)
    held = Reservation(team=event.team, period=event.period, micros=event.amount_micros)
    resolved = catalog.resolve(policy.catalog, event.model_id)
    if resolved is None or not resolved.model.endpoint:
        return [
            RouteUnavailable(
                **env,
                caller=event.caller,
                requested_model=event.chat.model,
                reason="route_unavailable",
                reservation=held,
                reply_to=event.reply_to,
                detail=f"no active endpoint serves {event.model_id!r}",
            )
        ]
    model = resolved.model
    substituted = event.chat.model if event.chat.model != model.id else None
    return [
        RouteSelected(
            **env,
            caller=event.caller,
            requested_model=event.chat.model,
            model_id=model.id,
            endpoint=model.endpoint,
            substituted_from=substituted,
            max_tokens=event.max_tokens,
            chat=event.chat,
            reservation=held,
            reply_to=event.reply_to,
        )
    ]
