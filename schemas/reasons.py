"""Reason codes shared by error events, NATS replies and HTTP error bodies.

A code is part of the public contract: callers branch on it, so codes are only ever added.
"""

from typing import Literal

ReasonCode = Literal[
    "invalid_request",  # malformed JSON or a missing/ill-typed field
    "body_too_large",
    "token_missing",
    "token_malformed",
    "token_bad_algorithm",
    "token_unknown_key",
    "token_bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "token_missing_claim",
    "label_invalid",
    "clearance_insufficient",
    "accreditation_insufficient",
    "write_down",
    "policy_denied",
    "model_not_found",
    "model_forbidden",
    "budget_exceeded",
    "budget_not_configured",
    "route_unavailable",
    "invocation_failed",
    "request_failed",
    "timeout",
    "reply_subject_refused",  # gw.submit.<app> without a reply subject under the app's own inbox
    "authorization_stale",  # an authorization older than the budget's memory of closed requests
    "strategy_not_allowed",  # a routing strategy the catalog does not let requests for the model ask for
    "context_length_exceeded",  # the model server says the prompt and max_tokens do not fit its context
    "rate_limited",  # a rate limit of the team, the application or the model is reached this minute (429)
    "audit_unavailable",  # the stream cannot record the request now (broker down, stream full, no quorum):
    # it was not recorded, so it is neither run nor charged (AU-5: nothing is served unrecorded)
]

HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "reply_subject_refused": 400,
    "authorization_stale": 409,
    "body_too_large": 413,
    "token_missing": 401,
    "token_malformed": 401,
    "token_bad_algorithm": 401,
    "token_unknown_key": 401,
    "token_bad_signature": 401,
    "token_expired": 401,
    "token_not_yet_valid": 401,
    "token_missing_claim": 401,
    "label_invalid": 400,
    "clearance_insufficient": 403,
    "accreditation_insufficient": 403,
    "write_down": 403,
    "policy_denied": 403,
    "strategy_not_allowed": 403,
    "context_length_exceeded": 400,
    "model_not_found": 404,
    "model_forbidden": 403,
    "budget_exceeded": 402,
    "rate_limited": 429,
    "budget_not_configured": 403,
    "route_unavailable": 503,
    "audit_unavailable": 503,
    "invocation_failed": 502,
    "request_failed": 500,
    "timeout": 504,
}

# OpenAI's error `type` field: the official client maps status codes to exception classes,
# the type string is what dashboards group by.
# An invocation error (InvocationFailed.error, not a caller-facing code): a streamed attempt was
# delivered to an invoker again, so its tokens may already have reached the caller: no invoker
# starts it again and the router starts no other (the caller would read the answer twice).
STREAM_BROKEN = "stream_broken"
# An invocation error that is the caller's to fix: no other endpoint of the model would take it.
CONTEXT_EXCEEDED = "context_length_exceeded"
REFUSED_AS_MALFORMED = ("http_400", "http_422")  # the request itself, not the server: no fallback helps
# The finish reason of a streamed answer that broke off after tokens reached the caller: they are
# its answer (recorded and charged), and the caller is told it was cut short.
INTERRUPTED = "interrupted"

ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}


def http_status(code: str) -> int:
    """HTTP status for a reason code; unknown codes are server errors."""
    return HTTP_STATUS.get(code, 500)
