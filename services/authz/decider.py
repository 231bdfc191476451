"""Authz decider: who may call which model (DESIGN §3). Pure: clock, keys and policy come in.

Rule ids name what fired in every denial: `session-token` (the token's own defect code is the
reason), `catalog` (unknown model), `team-model-access` (no principal may use the model).
"""

from datetime import datetime

import jwt
from msgspec import Struct

from ...schemas.events import AnyEvent, Caller, Event, RequestAuthorized, RequestDenied, RequestSubmitted, envelope
from ...schemas.policy import PolicyBundle
from .. import catalog
from .access import AccessRules
from .tokens import TokenDefect, verify

STAGE = "authz"


class AuthzState(Struct, frozen=True):
    """Authz keeps no state between requests."""


class AuthzPolicy(Struct, frozen=True, kw_only=True):
    """What an authz decision depends on."""

    bundle: PolicyBundle
    rules: AccessRules
    keys: jwt.PyJWKSet


def initial_state() -> AuthzState:
    """The empty state."""
    return AuthzState()


def evolve(state: AuthzState, event: Event) -> AuthzState:
    """Authz is stateless: every event leaves the state as it is."""
    return state


def decide(cmd: RequestSubmitted, state: AuthzState, policy: AuthzPolicy, now: datetime) -> list[AnyEvent]:
    """Authorize one submitted request: exactly one RequestAuthorized or RequestDenied."""
    env = envelope(cmd.request_id, STAGE, now, policy.bundle.version)
    claims = verify(cmd.token, policy.keys, now)
    if isinstance(claims, TokenDefect):
        return [
            RequestDenied(
                **env,
                reason=claims.code,
                rule="session-token",
                detail=claims.detail,
                model=cmd.chat.model,
                reply_to=cmd.reply_to,
            )
        ]
    caller = Caller(subject=claims.subject, team=claims.team, roles=claims.roles, token_id=claims.token_id)
    resolved = catalog.resolve(policy.bundle.catalog, cmd.chat.model)
    if resolved is None:
        return [
            RequestDenied(
                **env,
                reason="model_not_found",
                rule="catalog",
                caller=caller,
                model=cmd.chat.model,
                detail=f"model {cmd.chat.model!r} is not in the catalog",
                reply_to=cmd.reply_to,
            )
        ]
    principals = (f"team:{caller.team}", *(f"role:{r}" for r in caller.roles))
    if not policy.rules.allows(principals, resolved.model.id):
        return [
            RequestDenied(
                **env,
                reason="model_forbidden",
                rule="team-model-access",
                caller=caller,
                model=cmd.chat.model,
                reply_to=cmd.reply_to,
                detail=f"team {caller.team!r} may not use {resolved.model.id!r}",
            )
        ]
    return [RequestAuthorized(**env, caller=caller, model_id=resolved.model.id, chat=cmd.chat, reply_to=cmd.reply_to)]
