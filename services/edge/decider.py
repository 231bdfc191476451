"""Edge decisions: validate what callers send, and say what they get back. Pure.

Both entries (HTTP and `gw.submit`) become the same `RequestSubmitted`; every terminal event
becomes the same `SubmitReply`, which the HTTP edge renders in OpenAI's shapes.
"""

from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
from msgspec import Struct

from ...schemas import codec, subjects
from ...schemas.commands import ChatBody, ChatMessage, Completion, ErrorBody, SubmitReply, SubmitRequest, Usage
from ...schemas.events import (
    AnyEvent,
    BudgetRejected,
    Event,
    InvocationCompleted,
    InvocationFailed,
    MessageRejected,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    ResponseDelivered,
    ResponseUndelivered,
    RouteUnavailable,
    envelope,
)
from ...schemas.policy import STRATEGIES
from ..remembered import Remembered

Terminal = RequestDenied | BudgetRejected | RouteUnavailable | InvocationCompleted | InvocationFailed | RequestFailed
STAGE = "edge"
# Carries the caller's team from the responder to the edge replica holding an HTTP caller, so the
# fact that replica records names the team; only edge replicas may publish on `_INBOX_edge.>`.
TEAM_HEADER = "Gw-Team"
MODEL_MS_HEADER = "Gw-Model-Ms"  # the model call's own time: what /metrics subtracts for the gateway's added time
ReplyRoute = Literal["application", "edge", "refused", "none"]
HolderView = Literal["waiting", "answered", "gone"]


class EdgeState(Struct, frozen=True, kw_only=True):
    """The requests whose outcome was already recorded (idempotency)."""

    recorded: Remembered = Remembered()


def initial_state() -> EdgeState:
    """The empty state."""
    return EdgeState()


def evolve(state: EdgeState, event: Event) -> EdgeState:
    """A recorded outcome remembers its request."""
    if isinstance(event, ResponseDelivered | ResponseUndelivered):
        return EdgeState(recorded=state.recorded.add(event.request_id, event.occurred_at))
    return state


class StreamOptionsIn(Struct, frozen=True, kw_only=True):
    """OpenAI's `stream_options`."""

    include_usage: bool = False


class _ContentPart(Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class _InMessage(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A message as OpenAI accepts it: content as text, or an array of parts (text ones here)."""

    role: str
    content: str | tuple[_ContentPart, ...] | None  # required, as OpenAI's; null only means no text
    tool_calls: Any | None = None  # an assistant's earlier tool calls: refused by name (no tools here)
    function_call: Any | None = None
    audio: Any | None = None
    name: Any | None = None  # a participant's name, which the model would see: not passed on, so refused
    tool_call_id: Any | None = None
    refusal: Any | None = None


class OpenAIChatRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The OpenAI chat-completions fields the gateway honours, and those it refuses by name rather
    than ignore (`n` above 1, tools, functions): a caller never gets less than it asked for silently."""

    model: str
    messages: tuple[_InMessage, ...]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptionsIn | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any | None = None
    # OpenAI fields the gateway does not honour: accepted at their neutral value (what many clients
    # send by default), refused by name otherwise, never silently ignored (NEUTRAL below)
    function_call: Any | None = None
    response_format: Any | None = None
    logit_bias: Any | None = None
    logprobs: Any | None = None
    top_logprobs: Any | None = None
    stop: Any | None = None
    presence_penalty: Any | None = None
    frequency_penalty: Any | None = None
    top_p: Any | None = None
    modalities: Any | None = None
    audio: Any | None = None
    prediction: Any | None = None
    reasoning_effort: Any | None = None
    web_search_options: Any | None = None
    verbosity: Any | None = None
    store: Any | None = None
    service_tier: Any | None = None
    # Accepted as sent: they change nothing about the answer (an end-user id for the caller's own
    # abuse tracing, tags, and a switch that only matters with tools, which are refused)
    user: Any | None = None
    metadata: Any | None = None
    parallel_tool_calls: Any | None = None


_chat_request = msgspec.json.Decoder(OpenAIChatRequest)
# The value of each unhonoured field that asks for nothing (a client library's default); any other
# value is refused by name. Fields absent here (user, metadata, store, service_tier,
# parallel_tool_calls without tools) change nothing about the answer and are accepted as sent.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "function_call": ("none", "auto"),  # with no functions, "auto" asks for nothing either
    "store": (False,),
    "service_tier": ("auto", "default"),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "stop": ([],),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "top_p": (1, 1.0),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
}
ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system
MAX_MODEL_NAME = 256


def parse_openai_request(body: bytes) -> OpenAIChatRequest:
    """Validate an HTTP body; raises codec.DecodeError naming the bad path (never quoting content)."""
    req: OpenAIChatRequest = codec.decode_json(_chat_request, body)
    if req.n not in (None, 1):
        raise codec.DecodeError("`n` must be 1: one choice per request is supported")
    if req.tools or req.functions or req.tool_choice not in (None, "none"):
        raise codec.DecodeError("tools, functions and tool_choice are not supported by this gateway")
    for field, neutral in NEUTRAL.items():
        value = getattr(req, field)
        if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
            raise codec.DecodeError(f"`{field}` is not supported by this gateway (send it unset)")
    for i, m in enumerate(req.messages):
        for field in ("tool_calls", "function_call", "audio", "name", "tool_call_id", "refusal"):
            if getattr(m, field) is not None:
                raise codec.DecodeError(f"messages[{i}].{field} is not supported by this gateway")
        if isinstance(m.content, tuple) and any(p.type != "text" or p.text is None for p in m.content):
            raise codec.DecodeError(f"messages[{i}]: only text content parts are supported")
    validate_chat(to_chat(req))
    return req


def to_chat(req: OpenAIChatRequest, strategy: str | None = None) -> ChatBody:
    """The chat body the pipeline carries (`strategy`: what the caller asked to route by); text
    parts are joined, and the `developer` role is `system` for servers that lack it."""
    return ChatBody(
        strategy=strategy,
        model=req.model,
        messages=tuple(ChatMessage(role="system" if m.role == "developer" else m.role, content=_text(m.content))
                       for m in req.messages),
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        temperature=req.temperature,
        seed=req.seed,
        stream=bool(req.stream),
        include_usage=bool(req.stream) and req.stream_options is not None and req.stream_options.include_usage,
    )


def _text(content: str | tuple[_ContentPart, ...] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text or "" for p in content)


def validate_chat(chat: ChatBody) -> None:
    """Rules msgspec's types cannot say; raises codec.DecodeError (never quoting the caller's text)."""
    if not chat.model:
        raise codec.DecodeError("`model` must not be empty")
    if len(chat.model) > MAX_MODEL_NAME:
        raise codec.DecodeError(f"`model` is longer than {MAX_MODEL_NAME} characters")
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            raise codec.DecodeError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
    if chat.temperature is not None and not 0 <= chat.temperature <= 2:
        raise codec.DecodeError("`temperature` must be between 0 and 2")
    if not chat.messages:
        raise codec.DecodeError("`messages` must hold at least one message")
    if chat.max_tokens is not None and chat.max_tokens < 1:
        raise codec.DecodeError("`max_tokens` must be at least 1")
    if chat.strategy is not None and chat.strategy not in STRATEGIES:
        raise codec.DecodeError(f"routing strategy {chat.strategy[:64]!r} is not one of {', '.join(STRATEGIES)}")


def refuse_reply_subject(subject: str, reply_to: str | None) -> str | None:
    """Why a `gw.submit.<app>` request must be refused unanswered and unrun, or None when it may run.

    Only application `app` may publish `gw.submit.<app>` (the server enforces it), so the subject
    names the sender; the answer may go only below that application's own inbox. Anything else
    (no reply subject, another application's inbox, an event subject) would let a caller make the
    edge publish where the caller itself may not.
    """
    app = subjects.app_of_submit(subject)
    if app is None:
        return f"{subject!r} is not an application's submit subject"
    if not reply_to:
        return "a request must carry a reply subject under the application's own inbox"
    if not reply_to.startswith(subjects.app_inbox(app) + ".") or reply_route(reply_to) != "application":
        # one predicate with the responder: what the entry admits, the responder will answer
        return f"reply subject {reply_to!r} is not a subject under {subjects.app_inbox(app)}."
    return None


def caller_wait_s(cmd: SubmitRequest, timeout_s: float) -> float:
    """How long the caller waits: the edge's request timeout, or the caller's own when shorter."""
    return min(timeout_s, cmd.timeout_s) if cmd.timeout_s is not None and cmd.timeout_s > 0 else timeout_s


def submitted(
    request_id: str,
    entry: Literal["http", "nats"],
    cmd: SubmitRequest,
    reply_to: str,
    now: datetime,
    policy_version: str,
    timeout_s: float = 120.0,
) -> RequestSubmitted:
    """The fact that a valid request entered the gateway, with the labels the caller declared and
    its deadline: the edge's timeout, or the caller's own when shorter."""
    wait = caller_wait_s(cmd, timeout_s)
    return RequestSubmitted(
        **envelope(request_id, "submit", now, policy_version),
        entry=entry,
        token=cmd.token,
        chat=cmd.chat,
        reply_to=reply_to,
        input_label=cmd.input_label,
        output_label=cmd.output_label,
        deadline_at=now + timedelta(seconds=wait),
    )


def rejected(
    request_id: str, subject: str, reason: str, detail: str, now: datetime, policy_version: str
) -> MessageRejected:
    """The fact that bytes at an entry were refused before entering the pipeline."""
    return MessageRejected(
        **envelope(request_id, "reject", now, policy_version),
        subject=subject,
        stage=STAGE,
        reason=reason,
        detail=detail,
    )


def reply_for(event: Terminal) -> SubmitReply:
    """The one reply a caller gets for a terminal event."""
    rid = event.request_id
    match event:
        case InvocationCompleted():
            usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
            return SubmitReply(
                request_id=rid,
                completion=Completion(
                    model=event.model_id,
                    content=event.content,
                    finish_reason=event.finish_reason,
                    usage=usage,
                    reserved_micros=event.reservation.micros,
                ),
            )
        case RequestDenied():
            return _error(rid, event.reason, event.detail, rule=event.rule)
        case BudgetRejected() if event.reason == "rate_limited" and event.rates:
            over = event.rates[-1]
            limit = f"rate limit of {over.scope} {over.key!r}: {over.limit} {over.kind} per minute"
            # never what the counter read: a team's or a model's count is other callers' traffic (the
            # audit keeps it; a caller reading it each minute would learn what others send)
            when = (f"this request alone counts {over.counted}: ask for fewer max_tokens"
                    if event.retry_after_s is None else f"retry after {event.retry_after_s} s")
            return SubmitReply(request_id=rid, error=ErrorBody(
                code=event.reason, rule=f"rate-limit-{over.scope}", retry_after_s=event.retry_after_s,
                message=f"{limit} reached ({when})"))
        case BudgetRejected():
            msg = (
                f"team {event.caller.team!r} budget for {event.period or 'this period'}: requested "
                f"{event.requested_micros} micros, {event.remaining_micros} remaining of {event.cap_micros}"
            )
            return _error(
                rid,
                event.reason,
                msg,
                rule="team-spend-cap",
                remaining=event.remaining_micros,
                requested=event.requested_micros,
            )
        case RouteUnavailable():
            return _error(rid, event.reason, event.detail)
        case InvocationFailed():
            return _error(rid, "invocation_failed", f"{event.model_id} at {event.endpoint}: {event.error}")
        case RequestFailed():
            return _error(rid, event.reason, f"{event.stage}: {event.detail}")


def ends_request(event: Terminal) -> bool:
    """Whether the caller's answer is this event: a failed attempt the router routes again is not."""
    return not (isinstance(event, InvocationFailed) and not event.final)


def team_of(event: Terminal) -> str | None:
    """The team a terminal event belongs to, when the caller was identified."""
    match event:
        case RequestDenied():
            return event.caller.team if event.caller else None
        case RequestFailed():
            return event.reservation.team if event.reservation else None
        case _:
            return event.caller.team


def error_reply(request_id: str, code: str, message: str) -> SubmitReply:
    """A reply for a request refused at the entry."""
    return _error(request_id, code, message)


def _error(
    rid: str,
    code: str,
    message: str,
    rule: str | None = None,
    remaining: int | None = None,
    requested: int | None = None,
) -> SubmitReply:
    return SubmitReply(
        request_id=rid,
        error=ErrorBody(code=code, message=message, rule=rule, remaining_micros=remaining, requested_micros=requested),
    )


def reply_route(reply_to: str | None) -> ReplyRoute:
    """Who answers a reply subject, and so who records whether the caller got it (issue 8, item 7).

    `application`: a batch caller's inbox: the responder publishes and records. `edge`: an HTTP
    caller held by one edge replica, the only process that knows whether the caller still waits,
    so the responder forwards and that replica records. `refused`: anything else, never published
    (a terminal event's `reply_to` comes from upstream services). `none`: no reply subject at all.
    """
    if not reply_to:
        return "none"
    head, *rest = reply_to.split(".")
    if len(rest) < 2 or any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in rest):
        return "refused"
    if head == subjects.APP_INBOXES:
        return "application"
    return "edge" if head == subjects.EDGE_INBOXES and len(rest) == 2 else "refused"


def reply_target(reply_to: str | None) -> str | None:
    """The subject the responder may publish a reply on, or None when it must publish nothing."""
    return reply_to if reply_route(reply_to) in ("application", "edge") else None


def reply_headers(event: Terminal) -> dict[str, str] | None:
    """Headers of the reply to an HTTP caller's edge replica: the team, for the outcome it records,
    and the model call's time, for the gateway's added time."""
    if reply_route(event.reply_to) != "edge":
        return None
    team = team_of(event)
    headers = {TEAM_HEADER: team} if team else {}
    if isinstance(event, InvocationCompleted):
        headers[MODEL_MS_HEADER] = f"{event.latency_ms:.3f}"
    return headers or None


def decide(event: Terminal, state: EdgeState, policy_version: str, now: datetime) -> list[AnyEvent]:
    """The responder's fact for a terminal event; the reply itself goes to `reply_target(event.reply_to)`.

    A batch caller's reply is recorded as delivered once published: core NATS cannot tell whether
    the application still listens. An HTTP caller's is recorded by the replica holding it
    (`handed_over`), so the responder records nothing for it.
    """
    if event.request_id in state.recorded or not ends_request(event):
        return []  # its outcome is on record (a redelivered terminal records nothing twice), or it is not the end
    reply, team = reply_for(event), team_of(event)
    match reply_route(event.reply_to):
        case "application":
            return [delivered(reply, team, now, policy_version)]
        case "edge":
            return []
        case "refused":
            return [undelivered(reply, team, "reply_subject_refused", now, policy_version)]
        case "none":
            return [undelivered(reply, team, "no_reply_subject", now, policy_version)]


def handed_over(
    reply: SubmitReply, team: str | None, caller: HolderView, now: datetime, policy_version: str
) -> list[AnyEvent]:
    """The fact an edge replica records for a reply to one of its HTTP callers.

    `waiting`: the caller gets this reply (the pipeline's, or the 504 at its deadline); `gone`:
    the deadline passed or the caller hung up before the reply came; `answered`: a redelivered
    duplicate of a reply the caller already got, which changes nothing.
    """
    match caller:
        case "waiting":
            return [delivered(reply, team, now, policy_version)]
        case "gone":
            return [undelivered(reply, team, "caller_gone", now, policy_version)]
        case "answered":
            return []


def timeout_reply(request_id: str) -> SubmitReply:
    """The 504 an HTTP caller gets when no reply came within the request deadline."""
    return error_reply(request_id, "timeout", "no answer within the request deadline")


def delivered(reply: SubmitReply, team: str | None, now: datetime, policy_version: str) -> ResponseDelivered:
    """The fact that the caller got its reply."""
    code = reply.error.code if reply.error else None
    return ResponseDelivered(
        **envelope(reply.request_id, "deliver", now, policy_version),
        outcome="error" if reply.error else "completed",
        code=code,
        team=team,
    )


def undelivered(
    reply: SubmitReply,
    team: str | None,
    reason: Literal["caller_gone", "reply_subject_refused", "no_reply_subject"],
    now: datetime,
    policy_version: str,
) -> ResponseUndelivered:
    """The fact that a reply never reached its caller; `outcome` and `code` describe that reply."""
    return ResponseUndelivered(
        **envelope(reply.request_id, "undelivered", now, policy_version),
        outcome="error" if reply.error else "completed",
        code=reply.error.code if reply.error else None,
        team=team,
        reason=reason,
    )
