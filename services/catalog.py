"""Pure catalog look-ups shared by the authz, budget and router deciders."""

from msgspec import Struct

from ..schemas.commands import ChatBody
from ..schemas.policy import Catalog, ModelEntry

# The template overheads a model entry states when its catalog says nothing (schemas.policy).
_DEFAULTS = ModelEntry(id="_", context_length=1, default_max_tokens=1, prompt_micros_per_1k=0,
                       completion_micros_per_1k=0)


class Resolution(Struct, frozen=True, kw_only=True):
    """The model that will actually run, and the name it replaced, if any."""

    model: ModelEntry
    substituted_from: str | None = None


def find(catalog: Catalog, model_id: str) -> ModelEntry | None:
    """The entry with exactly this id."""
    for entry in catalog.model:
        if entry.id == model_id:
            return entry
    return None


def resolve(catalog: Catalog, name: str) -> Resolution | None:
    """Resolve an id or alias, following deprecations to their replacement (at most 8 hops)."""
    entry = find(catalog, name)
    if entry is None:
        entry = next((m for m in catalog.model if name in m.aliases), None)
    if entry is None:
        return None
    for _ in range(8):
        if entry.status != "deprecated" or entry.replacement is None:
            break
        nxt = find(catalog, entry.replacement)
        if nxt is None:
            break
        entry = nxt
    if entry.status == "retired":
        return None
    return Resolution(model=entry, substituted_from=None if entry.id == name else name)


def substitution(catalog: Catalog, name: str, served: str) -> str | None:
    """Why a request for `name` is served by `served` (None: it is the model asked for)."""
    if name == served:
        return None
    entry = find(catalog, name)
    prefix = ""
    if entry is None:
        entry = next((m for m in catalog.model if name in m.aliases), None)
        if entry is None:
            return None
        if entry.id == served:
            return f"alias of {served}"
        prefix = f"alias of {entry.id}; "
    chain = [entry.id]
    while entry is not None and entry.id != served and entry.replacement and len(chain) < 9:
        entry = find(catalog, entry.replacement)
        chain.append(entry.id if entry is not None else "?")
    return f"{prefix}deprecated: {' -> '.join(chain)}"


def all_endpoints(catalog: Catalog) -> set[str]:
    """Every endpoint any model of the catalog names."""
    return {e for m in catalog.model for e in endpoints_of(m)}


def endpoints_of(model: ModelEntry) -> tuple[str, ...]:
    """The endpoints serving a model, in the order the router tries them."""
    return model.endpoints or ((model.endpoint,) if model.endpoint else ())


def prompt_tokens_bound(chat: ChatBody, model: ModelEntry = _DEFAULTS) -> int:
    """An upper bound on a chat's prompt tokens: byte-level BPE never makes more tokens than bytes,
    plus the chat template's tokens around each message and the generation prompt."""
    body = sum(len(m.content.encode()) + len(m.role.encode()) + model.message_overhead_tokens for m in chat.messages)
    return body + model.prompt_overhead_tokens


def cost_micros(model: ModelEntry, prompt_tokens: int, completion_tokens: int) -> int:
    """Charge for a call, rounded up per side so a reservation computed the same way bounds it."""
    return _ceil_div(prompt_tokens * model.prompt_micros_per_1k, 1000) + _ceil_div(
        completion_tokens * model.completion_micros_per_1k, 1000
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
