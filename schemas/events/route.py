"""Facts about routing a request to a model server (DESIGN §5)."""

from ..commands import ChatBody
from .base import Caller, Event, Reservation


class RouteSelected(Event, frozen=True, kw_only=True, tag="RouteSelected"):
    """The router chose a model and endpoint; `substituted_from` records an alias or swap."""

    caller: Caller
    requested_model: str
    model_id: str
    endpoint: str
    substituted_from: str | None = None
    max_tokens: int
    chat: ChatBody
    reservation: Reservation
    reply_to: str


class RouteUnavailable(Event, frozen=True, kw_only=True, tag="RouteUnavailable"):
    """No eligible endpoint serves the model."""

    caller: Caller
    requested_model: str
    reason: str
    detail: str
    reservation: Reservation
    reply_to: str
