"""The policy bundle as data: catalog, budgets and access rules (DESIGN §3-§5).

File-backed structs forbid unknown fields: in a policy an unknown key is a typo (STYLE §3).
The bundle's `version` is the sha256 of its files, so every decision names exactly what it used.
"""

from typing import Literal

from msgspec import Struct

Strategy = Literal["ordered", "weighted", "cheapest", "latency"]
STRATEGIES: tuple[Strategy, ...] = ("ordered", "weighted", "cheapest", "latency")


class ModelEntry(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model of the catalog."""

    id: str
    # The endpoints that serve it, in the order the router tries them (the first is preferred; the
    # next takes over when one fails). `endpoint` is the one-endpoint form of catalogs written
    # before fallbacks, kept so every recorded policy still loads; a model names one or the other.
    endpoint: str = ""
    endpoints: tuple[str, ...] = ()
    # How the router ranks the endpoints: "ordered" (catalog order: the first whose circuit is
    # closed, the others stand by), "weighted" (a first attempt spread by `weights`, one per
    # endpoint, drawn from the request id so every replica and replay pick the same), "cheapest"
    # (lowest `costs` first: what an endpoint costs to run, one per endpoint; the team's charge is
    # the model's rates whichever serves) or "latency" (lowest observed latency first, learned by
    # the router from completions; the figures it used are recorded in the route).
    strategy: Strategy = "ordered"
    weights: tuple[int, ...] = ()
    costs: tuple[int, ...] = ()
    # The strategies a request may ask for instead (X-Routing-Strategy, or `strategy` on gw.submit);
    # the model's own is always allowed. Asking for any other is refused (strategy_not_allowed).
    strategies_allowed: tuple[Strategy, ...] = ()
    # How its endpoints are called: "openai" (vLLM, TGI, llama.cpp, Ollama: OpenAI-compatible),
    # "anthropic" (Messages API) or "bedrock" (Converse): the last two are hosted APIs outside any
    # enclave, refused in enclave mode
    protocol: Literal["openai", "anthropic", "bedrock"] = "openai"
    context_length: int
    default_max_tokens: int
    # The most completion tokens one call may ask for (None: up to the context length); a caller's
    # larger max_tokens is cut to it, and so is the reservation.
    max_output_tokens: int | None = None
    prompt_micros_per_1k: int
    completion_micros_per_1k: int
    status: Literal["active", "deprecated", "retired"] = "active"
    replacement: str | None = None
    aliases: tuple[str, ...] = ()
    # The highest label this model (and the servers behind its endpoint) is accredited for.
    accreditation: str = "UNCLASSIFIED"
    # Chat templates add tokens around each message and the generation prompt; the budget's
    # worst case counts them so the reservation is a true upper bound (DESIGN §4).
    message_overhead_tokens: int = 8
    prompt_overhead_tokens: int = 16


class Routing(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the router treats failures: retries of one endpoint, and a circuit breaker per endpoint."""

    # failed attempts within the last breaker_cooldown_s that open an endpoint's circuit: the
    # router sends requests elsewhere until they age out
    breaker_failures: int = 3
    breaker_cooldown_s: int = 30
    # after a failure that may pass (a timeout, a refused connection, a 5xx or 429), the same
    # endpoint is tried again this many times, each after an exponential backoff with jitter
    # (retry_backoff_ms, then twice that, ...), before the next endpoint; never past the deadline
    retries_per_endpoint: int = 1
    retry_backoff_ms: int = 100
    # A model server's refusal of the request itself (a 400 or 422, the context exceeded) ends it
    # with that error for the caller instead of trying the next endpoint, which would refuse it too.
    # Off unless stated, so a catalog recorded before it replays as it was decided.
    end_on_refusal: bool = False


class Catalog(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every model the gateway may route to, and how failing endpoints are avoided."""

    model: tuple[ModelEntry, ...]
    routing: Routing = Routing()


class TeamBudget(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A team's hard cap per period, in integer micro-units."""

    cap_micros: int
    period: Literal["month", "day"] = "month"
    # Soft thresholds, percent of the cap committed (spent + reserved): BudgetThresholdCrossed.
    thresholds_pct: tuple[int, ...] = (50, 80, 100)


class Budgets(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Caps by team name, and how long a reservation may stay open before it expires."""

    teams: dict[str, TeamBudget]
    # Longer than any invocation can take (the invoker's deadline plus its redeliveries), so only a
    # reservation whose request was lost expires; its money goes back by a BudgetReleased event.
    reservation_ttl_s: int = 900


class RateLimit(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Requests and tokens (prompt plus most output, settled on actual usage) per UTC minute."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class ContentMarkingGuard(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What authz does with classification markings found in the prompt's text (issue 12 item 2):
    `enforce` raises the request's input label to their high-water mark, `report` only records them."""

    mode: Literal["enforce", "report", "off"] = "enforce"
    # Which recognizer (services/authz/markings.py RULES). What it recognises changes only by a new
    # version beside the old, so a request is re-decided by the recognizer its policy named.
    rules: Literal[1] = 1


class Admission(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`admission.toml`: rate limits by team, by application (the session token's subject) and by
    model (catalog id, across teams), and the content-marking guard."""

    content_marking: ContentMarkingGuard = ContentMarkingGuard()
    team: dict[str, RateLimit] = {}
    application: dict[str, RateLimit] = {}
    model: dict[str, RateLimit] = {}


class PolicyBundle(Struct, frozen=True, kw_only=True):
    """Everything a decision depends on, with the version that names it."""

    version: str
    catalog: Catalog
    budgets: Budgets
    access_model: str
    access_policy: str
    issuers_jwks: str = '{"keys": []}'
    # None: a bundle without admission.toml (every bundle recorded before issue 12): no rate limits
    # and no content-marking guard, so its decisions replay as they were made
    admission: Admission | None = None
