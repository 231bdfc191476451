"""Authz decider: who may call which model, and no write-down (DESIGN §3). Pure: clock, keys
and policy come in as arguments.

Every denial names the rule that fired: `session-token` (the token's own defect code is the
reason), `label-syntax`, `catalog`, `team-model-access`, then the lattice rules of the bundle in
its order (`clearance-dominates-input`, `accreditation-dominates-input`, `no-write-down`).

Missing labels fail closed: an undeclared input is taken to be as high as the session's
clearance (it may carry anything the caller can see), an undeclared output channel as low as
UNCLASSIFIED. So a cleared caller that declares nothing is refused by no-write-down.
"""

from datetime import datetime

from msgspec import Struct

from ...schemas.events import (
    AnyEvent,
    Caller,
    Event,
    RequestAuthorized,
    RequestDenied,
    RequestSubmitted,
    envelope,
)
from ...schemas.events.request import ContentMarking
from ...schemas.labels import UNCLASSIFIED, Label, LabelError, dominates, format_label, join, parse_label
from ...schemas.policy import Admission, PolicyBundle
from .. import catalog
from ..remembered import Remembered
from . import markings
from .access import TEAM_MODEL_ACCESS, AccessRules
from .tokens import KeyRing, TokenCache, TokenDefect, verify

STAGE = "authz"
CONTENT_MARKING = "content-marking"  # the rule a denial names when a marking in the prompt raised the label
REASONS = {
    TEAM_MODEL_ACCESS: "model_forbidden",
    "clearance-dominates-input": "clearance_insufficient",
    "accreditation-dominates-input": "accreditation_insufficient",
    "no-write-down": "write_down",
}


class AuthzState(Struct, frozen=True, kw_only=True):
    """The requests already decided (idempotency, issue 9 item 2); nothing else is kept."""

    decided: Remembered = Remembered()


class AuthzPolicy(Struct, frozen=True, kw_only=True):
    """What an authz decision depends on: the bundle, its compiled rules and the issuer keys."""

    bundle: PolicyBundle
    rules: AccessRules
    keys: KeyRing
    # A memo of signature checks for this key ring only; decisions are the same with or without it.
    tokens: TokenCache | None = None
    max_token_lifetime_s: int | None = None  # issuers.jwks.json's bound on exp - iat (none: unbounded)


def initial_state() -> AuthzState:
    """The empty state."""
    return AuthzState()


def evolve(state: AuthzState, event: Event) -> AuthzState:
    """A decision of this stage remembers its request; every other event leaves the state as it is."""
    if isinstance(event, RequestAuthorized | RequestDenied):
        return AuthzState(decided=state.decided.add(event.request_id, event.occurred_at))
    return state


def effective_labels(cmd: RequestSubmitted, clearance: Label) -> tuple[Label, Label]:
    """Input and output labels after the fail-closed defaults; raises LabelError."""
    input_label = parse_label(cmd.input_label) if cmd.input_label else clearance
    output_label = parse_label(cmd.output_label) if cmd.output_label else UNCLASSIFIED
    return input_label, output_label


def decide(cmd: RequestSubmitted, state: AuthzState, policy: AuthzPolicy, now: datetime) -> list[AnyEvent]:
    """Authorize one submitted request: exactly one RequestAuthorized or RequestDenied (none if decided before)."""
    if cmd.request_id in state.decided:
        return []
    env = envelope(cmd.request_id, STAGE, now, policy.bundle.version)

    def deny(
        reason: str, rule: str, detail: str, caller: Caller | None = None, labels: tuple[Label, Label] | None = None
    ) -> list[AnyEvent]:
        shown = (format_label(labels[0]), format_label(labels[1])) if labels else (cmd.input_label, cmd.output_label)
        return [
            RequestDenied(
                **env,
                reason=reason,
                rule=rule,
                detail=detail,
                caller=caller,
                model=cmd.chat.model,
                reply_to=cmd.reply_to,
                input_label=shown[0],
                output_label=shown[1],
            )
        ]

    claims = verify(cmd.token, policy.keys, now, policy.tokens, policy.max_token_lifetime_s)
    if isinstance(claims, TokenDefect):
        return deny(claims.code, "session-token", claims.detail)
    caller = Caller(
        subject=claims.subject,
        team=claims.team,
        roles=claims.roles,
        token_id=claims.token_id,
        clearance=format_label(claims.clearance),
    )
    try:
        labels = effective_labels(cmd, claims.clearance)
    except LabelError as exc:
        return deny("label_invalid", "label-syntax", str(exc), caller)
    resolved = catalog.resolve(policy.bundle.catalog, cmd.chat.model)
    if resolved is None:
        return deny("model_not_found", "catalog", f"model {cmd.chat.model!r} is not in the catalog", caller, labels)
    model = resolved.model
    principals = (f"team:{caller.team}", *(f"role:{r}" for r in caller.roles))
    accreditation = parse_label(model.accreditation)
    rule = policy.rules.first_denial(principals, claims.clearance, model.id, accreditation, *labels)
    if rule is not None:
        detail = _explain(rule, caller, model.id, model.accreditation, labels)
        return deny(REASONS.get(rule, "policy_denied"), rule, detail, caller, labels)
    marked = content_marking(cmd, labels[0], policy.bundle.admission)
    if marked is not None and marked.enforced:
        raised = (parse_label(marked.label), labels[1])
        rule = policy.rules.first_denial(principals, claims.clearance, model.id, accreditation, *raised)
        if rule is not None:  # the declared labels passed: the marking in the text is what refuses
            detail = (f"the prompt carries {marked.found}, which raises the input label to {marked.label}: "
                      + _explain(rule, caller, model.id, model.accreditation, raised))
            return [RequestDenied(**env, reason=REASONS.get(rule, "policy_denied"), rule=CONTENT_MARKING,
                                  detail=detail, caller=caller, model=cmd.chat.model, reply_to=cmd.reply_to,
                                  input_label=marked.label, output_label=format_label(labels[1]),
                                  content_marking=marked)]
        labels = raised
    return [
        RequestAuthorized(
            **env,
            caller=caller,
            model_id=model.id,
            chat=cmd.chat,
            reply_to=cmd.reply_to,
            input_label=format_label(labels[0]),
            output_label=format_label(labels[1]),
            deadline_at=cmd.deadline_at,
            content_marking=marked,
        )
    ]


def content_marking(cmd: RequestSubmitted, declared: Label, admission: Admission | None) -> ContentMarking | None:
    """The markings in the prompt that are above the declared input label, per the bundle's guard
    (none: no guard in the bundle, the guard off, nothing found, or nothing above the declared label)."""
    mode = admission.content_marking.mode if admission is not None else "off"
    if mode == "off":
        return None
    found = markings.scan([m.content for m in cmd.chat.messages])
    top = markings.high_water(found)
    if top is None or dominates(declared, top):
        return None
    above = [f for f in found if not dominates(declared, f.label)]
    return ContentMarking(label=format_label(join(declared, top)), found=markings.describe(above),
                          enforced=mode == "enforce")


def visible_models(token: str, policy: AuthzPolicy, now: datetime) -> list[str] | TokenDefect:
    """The catalog ids a session's team and roles may use (GET /v1/models lists no others)."""
    claims = verify(token, policy.keys, now, policy.tokens, policy.max_token_lifetime_s)
    if isinstance(claims, TokenDefect):
        return claims
    principals = (f"team:{claims.team}", *(f"role:{r}" for r in claims.roles))
    return [
        m.id for m in policy.bundle.catalog.model if m.status != "retired" and policy.rules.may_use(principals, m.id)
    ]


def _explain(rule: str, caller: Caller, model_id: str, accreditation: str, labels: tuple[Label, Label]) -> str:
    inp, out = format_label(labels[0]), format_label(labels[1])
    match rule:
        case "team-model-access":
            return f"team {caller.team!r} may not use {model_id!r}"
        case "clearance-dominates-input":
            return f"clearance {caller.clearance} does not dominate input {inp}"
        case "accreditation-dominates-input":
            return f"{model_id} is accredited for {accreditation}, not input {inp}"
        case "no-write-down":
            return f"output channel {out} does not dominate input {inp} (write-down)"
        case _:
            return f"rule {rule} refused"
