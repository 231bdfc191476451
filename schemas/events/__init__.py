"""Every event type of the contract, and the union the codec decodes."""

from .audit import AuditCheckpoint, ConsoleViewed
from .base import Caller, Envelope, Event, Reservation, envelope
from .budget import (
    BudgetClockTicked,
    BudgetRejected,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    LedgerTotals,
    RateCount,
)
from .invocation import InvocationCompleted, InvocationFailed
from .policy import PolicyActivated
from .request import (
    ContentMarking,
    MessageRejected,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    RequestSubmitted,
    ResponseDelivered,
    ResponseUndelivered,
)
from .route import EndpointObserved, RouteSelected, RouteUnavailable

AnyEvent = (
    RequestSubmitted
    | RequestAuthorized
    | RequestDenied
    | RequestFailed
    | MessageRejected
    | ResponseDelivered
    | ResponseUndelivered
    | BudgetReserved
    | BudgetRejected
    | BudgetSettled
    | BudgetReleased
    | BudgetThresholdCrossed
    | RouteSelected
    | RouteUnavailable
    | InvocationCompleted
    | InvocationFailed
    | PolicyActivated
    | AuditCheckpoint
    | BudgetClockTicked
    | EndpointObserved
    | ConsoleViewed
)

CURRENT_EVENT_TYPES: tuple[type[Event], ...] = (
    RequestSubmitted,
    RequestAuthorized,
    RequestDenied,
    RequestFailed,
    MessageRejected,
    ResponseDelivered,
    ResponseUndelivered,
    BudgetReserved,
    BudgetRejected,
    BudgetSettled,
    BudgetReleased,
    BudgetThresholdCrossed,
    RouteSelected,
    RouteUnavailable,
    InvocationCompleted,
    InvocationFailed,
    PolicyActivated,
    AuditCheckpoint,
    BudgetClockTicked,
    EndpointObserved,
    ConsoleViewed,
)

__all__ = [
    "CURRENT_EVENT_TYPES",
    "AnyEvent",
    "AuditCheckpoint",
    "BudgetClockTicked",
    "BudgetRejected",
    "BudgetReleased",
    "BudgetReserved",
    "BudgetSettled",
    "BudgetThresholdCrossed",
    "Caller",
    "ConsoleViewed",
    "ContentMarking",
    "EndpointObserved",
    "Envelope",
    "Event",
    "InvocationCompleted",
    "InvocationFailed",
    "LedgerTotals",
    "MessageRejected",
    "PolicyActivated",
    "RateCount",
    "RequestAuthorized",
    "RequestDenied",
    "RequestFailed",
    "RequestSubmitted",
    "Reservation",
    "ResponseDelivered",
    "ResponseUndelivered",
    "RouteSelected",
    "RouteUnavailable",
    "envelope",
]
