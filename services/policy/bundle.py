"""The policy bundle: read from a folder, validated for structure, named by sha256.

Structural validation (catalog, budgets, labels, team names) lives here; the access rules and
issuer keys are validated by compiling them (`authz.policy_view`), which `gateway policy sign` and
`activate` do before anything is signed or published, and authz and edge do again on activation.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tomllib
from pathlib import Path

import msgspec

from ...schemas import subjects
from ...schemas.labels import LabelError, parse_label
from ...schemas.policy import Admission, Budgets, Catalog, ModelEntry, PolicyBundle
from ..catalog import all_endpoints

REQUIRED = ("catalog.toml", "budgets.toml", "access_model.conf", "access_policy.csv", "issuers.jwks.json")
# Files a bundle may hold or not. One that is absent changes nothing of the digest, so bundles
# recorded before a file existed keep their version and their signatures.
OPTIONAL = ("admission.toml",)
FILES = REQUIRED + OPTIONAL  # every file a bundle may hold
# A team name becomes a subject token (its ledger, its authorizations): only these characters
# keep the mapping one-to-one, so two teams can never share a ledger (`a.b` and `a_b` would).
TEAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TEAM_IN_POLICY = re.compile(r"^\s*[pg]\w*\s*,\s*team:([^,\s]+)", re.MULTILINE)


class PolicyError(ValueError):
    """An invalid, unsigned or untrusted policy bundle; the message says which file and why."""


def digest(files: dict[str, str]) -> str:
    """sha256 over the bundle's files in a fixed order, names included."""
    h = hashlib.sha256()
    for name in (*REQUIRED, *(n for n in OPTIONAL if n in files)):
        h.update(name.encode() + b"\0" + files.get(name, "").encode() + b"\0")
    return h.hexdigest()


def version_of(files: dict[str, str]) -> str:
    """The name every decision records: the bundle's digest, shortened."""
    return "sha256:" + digest(files)[:16]


def read_files(folder: Path) -> dict[str, str]:
    """The bundle's files as text; raises PolicyError when one is missing."""
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if missing:
        raise PolicyError(f"policy bundle {folder} lacks {', '.join(missing)}")
    return {name: (folder / name).read_text() for name in FILES if (folder / name).is_file()}


def bundle_from_files(files: dict[str, str]) -> PolicyBundle:
    """Parse a bundle and check its structure; raises PolicyError naming the file and the reason."""
    missing = [n for n in REQUIRED if n not in files]
    extra = sorted(set(files) - set(FILES))
    if missing or extra:
        raise PolicyError(f"policy bundle must hold {', '.join(REQUIRED)}, and may hold {', '.join(OPTIONAL)} "
                          f"(missing {missing}, extra {extra})")
    with_nul = [n for n in files if "\0" in files[n]]
    if with_nul:  # the digest separates files with NUL: text holding one could shift bytes between files
        raise PolicyError(f"{', '.join(with_nul)}: a policy file may not contain a NUL character")
    try:
        catalog = msgspec.convert(tomllib.loads(files["catalog.toml"]), Catalog)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PolicyError(f"catalog.toml: {exc}") from exc
    try:
        budgets = msgspec.convert(tomllib.loads(files["budgets.toml"]), Budgets)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PolicyError(f"budgets.toml: {exc}") from exc
    admission = None
    if "admission.toml" in files:
        try:
            admission = msgspec.convert(tomllib.loads(files["admission.toml"]), Admission)
        except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise PolicyError(f"admission.toml: {exc}") from exc
    bundle = PolicyBundle(
        version=version_of(files),
        catalog=catalog,
        budgets=budgets,
        access_model=files["access_model.conf"],
        access_policy=files["access_policy.csv"],
        issuers_jwks=files["issuers.jwks.json"],
        admission=admission,
    )
    _check_catalog(bundle.catalog)
    if not 0 < bundle.budgets.reservation_ttl_s <= 86_400:
        # the budget remembers closed requests for two days; a reservation must close well within
        raise PolicyError("budgets.toml: reservation_ttl_s must be between 1 and 86400 seconds")
    check_team_names(list(bundle.budgets.teams), "budgets.toml")
    check_team_names(_TEAM_IN_POLICY.findall(bundle.access_policy), "access_policy.csv")
    if admission is not None:
        _check_admission(admission, bundle)
    return bundle


_APPLICATION = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


def _check_admission(admission: Admission, bundle: PolicyBundle) -> None:
    """Limits name teams with a budget, catalog models and plausible token subjects, and are positive."""
    unknown_teams = sorted(set(admission.team) - set(bundle.budgets.teams))
    if unknown_teams:
        raise PolicyError(f"admission.toml: [team] names teams with no budget: {', '.join(unknown_teams)}")
    unknown_models = sorted(set(admission.model) - {m.id for m in bundle.catalog.model})
    if unknown_models:
        raise PolicyError(f"admission.toml: [model] names no catalog model id: {', '.join(unknown_models)}")
    odd = sorted(a for a in admission.application if not _APPLICATION.match(a))
    if odd:
        raise PolicyError(f"admission.toml: [application] names must be a token subject "
                          f"(letters, digits, _.@:-, at most 128): {odd[0]!r}")
    for scope in ("team", "application", "model"):
        for key, limit in getattr(admission, scope).items():
            for value in (limit.requests_per_minute, limit.tokens_per_minute):
                if value is not None and not 1 <= value <= 10**9:
                    raise PolicyError(f"admission.toml: [{scope}.{key}] limits must be 1 to 10^9 per minute")


_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_catalog(catalog: Catalog) -> None:
    routing = catalog.routing
    if not (1 <= routing.breaker_failures <= 100 and 1 <= routing.breaker_cooldown_s <= 3600):
        raise PolicyError("catalog.toml: [routing] breaker_failures must be 1-100 and breaker_cooldown_s 1-3600")
    if not (0 <= routing.retries_per_endpoint <= 5 and 1 <= routing.retry_backoff_ms <= 60_000):
        raise PolicyError("catalog.toml: [routing] retries_per_endpoint must be 0-5 and retry_backoff_ms 1-60000")
    ids = [m.id for m in catalog.model]
    if len(ids) != len(set(ids)):
        raise PolicyError("catalog.toml: duplicate model ids")
    names: dict[str, str] = {}
    for model in catalog.model:
        for name in (model.id, *model.aliases):
            if names.setdefault(name, model.id) != model.id:
                raise PolicyError(f"catalog.toml: the name {name!r} would resolve to both {names[name]!r} and "
                                  f"{model.id!r}: ids and aliases must be unique across models")
    by_id = {m.id: m for m in catalog.model}
    durable_of: dict[str, str] = {}  # an endpoint's subject token names its invokers' durable: one per name
    for endpoint in sorted(all_endpoints(catalog)):
        if durable_of.setdefault(subjects.token(endpoint), endpoint) != endpoint:
            raise PolicyError(f"catalog.toml: endpoints {durable_of[subjects.token(endpoint)]!r} and {endpoint!r} "
                              "would share one invokers' durable: rename one")
    for model in catalog.model:
        _check_figures(model)
        _check_replacement(model, by_id)
        try:
            parse_label(model.accreditation)
        except LabelError as exc:
            raise PolicyError(f"catalog.toml: model {model.id!r} accreditation: {exc}") from exc
        if model.endpoint and model.endpoints:
            raise PolicyError(f"catalog.toml: model {model.id!r} names both endpoint and endpoints: keep endpoints")
        served = model.endpoints or ((model.endpoint,) if model.endpoint else ())
        if not served and model.status != "retired":
            raise PolicyError(f"catalog.toml: model {model.id!r} has no endpoint: name at least one in endpoints")
        usable = {model.strategy, *model.strategies_allowed}
        if "weighted" in usable and (len(model.weights) != len(served) or min(model.weights, default=0) < 1):
            raise PolicyError(f"catalog.toml: model {model.id!r} is weighted: give one positive weight per endpoint")
        if model.weights and "weighted" not in usable:
            raise PolicyError(f"catalog.toml: model {model.id!r} has weights but strategy {model.strategy!r}")
        if "cheapest" in usable and (len(model.costs) != len(served) or min(model.costs, default=0) < 0):
            raise PolicyError(f"catalog.toml: model {model.id!r} routes by cost: give one cost (0 or more) per "
                              "endpoint in costs")
        if model.costs and "cheapest" not in usable:
            raise PolicyError(f"catalog.toml: model {model.id!r} has costs but never routes by cost")
        if len(set(served)) != len(served) or not all(_ENDPOINT_NAME.match(e) for e in served):
            raise PolicyError(f"catalog.toml: model {model.id!r} endpoints {list(served)} must be distinct names of "
                              "1-64 of A-Z a-z 0-9 _ - .")


def _check_figures(model: ModelEntry) -> None:
    if not 1 <= model.default_max_tokens <= model.context_length:
        raise PolicyError(f"catalog.toml: model {model.id!r} needs 1 <= default_max_tokens <= context_length")
    if model.max_output_tokens is not None and not 1 <= model.max_output_tokens <= model.context_length:
        raise PolicyError(f"catalog.toml: model {model.id!r} needs 1 <= max_output_tokens <= context_length")
    if min(model.prompt_micros_per_1k, model.completion_micros_per_1k, model.message_overhead_tokens,
           model.prompt_overhead_tokens) < 0:
        raise PolicyError(f"catalog.toml: model {model.id!r} rates and overheads must not be negative")


def _check_replacement(model: ModelEntry, by_id: dict[str, ModelEntry]) -> None:
    if model.replacement is None:
        return
    if model.status != "deprecated":
        raise PolicyError(f"catalog.toml: {model.id!r} names a replacement but is {model.status}: only a "
                          "deprecated model is replaced")
    seen, wanted = {model.id}, model.replacement
    step = by_id.get(wanted)
    while step is not None and step.status == "deprecated" and step.replacement is not None:
        if step.id in seen:
            raise PolicyError(f"catalog.toml: the replacements of {model.id!r} form a cycle through {step.id!r}")
        seen.add(step.id)
        wanted = step.replacement
        step = by_id.get(wanted)
    if step is None:
        raise PolicyError(f"catalog.toml: {model.id!r} is replaced by unknown model {wanted!r}")
    if step.status == "retired":
        raise PolicyError(f"catalog.toml: {model.id!r} is replaced, in the end, by the retired model {step.id!r}")


def check_team_names(names: list[str], where: str) -> None:
    """Every team name is a subject-safe token, and no two share a subject; raises PolicyError."""
    seen: dict[str, str] = {}
    for name in names:
        if not TEAM_NAME.match(name):
            raise PolicyError(f"{where}: team name {name!r} must be 1-64 of A-Z a-z 0-9 _ - (it names NATS subjects)")
        token = subjects.token(name)
        if seen.setdefault(token, name) != name:
            raise PolicyError(f"{where}: teams {seen[token]!r} and {name!r} would share the subject token {token!r}")


def load_bundle(folder: Path) -> PolicyBundle:
    """Read a folder's bundle and check its structure."""
    return bundle_from_files(read_files(folder))


def git_commit(folder: Path) -> str | None:
    """The commit the bundle was loaded from, when it lives in a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
