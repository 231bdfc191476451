"""The one Decider protocol (STYLE §1, DESIGN §1): every service that decides has the same
`initial_state`, `decide(input, state, policy, now)` and `evolve(state, event)`.

The declarations below make mypy check each decider module against the protocol, so a signature
cannot drift. The invoker's outcome is an observation of a model server (recorded, never
re-decided) and the auditor's output is a row, not an event: they keep their own shapes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, TypeVar

from ..schemas.events import AnyEvent, Event, RequestSubmitted
from ..schemas.policy import PolicyBundle
from .authz import decider as authz
from .budget import decider as budget
from .edge import decider as edge
from .router import decider as router

I_contra = TypeVar("I_contra", contravariant=True)
P_contra = TypeVar("P_contra", contravariant=True)
S = TypeVar("S")


class Decider(Protocol[I_contra, S, P_contra]):
    """A pure decision function with its state: what the shells run and replay re-runs."""

    def initial_state(self) -> S:
        """The state before any event."""

    def decide(self, event: I_contra, state: S, policy: P_contra, now: datetime, /) -> list[AnyEvent]:
        """The facts this input calls for, under `policy`, at `now`."""

    def evolve(self, state: S, event: Event, /) -> S:
        """The state after one more fact."""


AUTHZ: Decider[RequestSubmitted, authz.AuthzState, authz.AuthzPolicy] = authz
BUDGET: Decider[budget.BudgetInput, budget.BudgetState, PolicyBundle] = budget
ROUTER: Decider[router.RouterInput, router.RouterState, PolicyBundle] = router
EDGE: Decider[edge.Terminal, edge.EdgeState, str] = edge  # the edge's "policy" is the version it records

__all__ = ["AUTHZ", "BUDGET", "EDGE", "ROUTER", "Decider"]
