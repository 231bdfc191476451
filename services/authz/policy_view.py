"""Authz's view of a policy bundle: its casbin rules and trusted token issuers, compiled once per
activation. The edge uses the same view for `GET /v1/models`; budget and router never build it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...schemas.policy import PolicyBundle
from ..policy import PolicyError
from ..settings import WorkerSettings, jwks_path
from .access import AccessError, AccessRules
from .decider import AuthzPolicy
from .tokens import TokenCache, keyring, max_lifetime


def compile_view(bundle: PolicyBundle, extra_jwks: list[str]) -> AuthzPolicy:
    """Rules and key ring of a bundle; raises PolicyError naming the file and the reason."""
    try:
        rules = AccessRules(bundle)
    except AccessError as exc:
        raise PolicyError(f"access_model.conf/access_policy.csv: {exc}") from exc
    try:
        keys = keyring([bundle.issuers_jwks, *extra_jwks])
        lifetime = max_lifetime(bundle.issuers_jwks)
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"issuers.jwks.json: {exc}") from exc
    return AuthzPolicy(bundle=bundle, rules=rules, keys=keys, tokens=TokenCache(), max_token_lifetime_s=lifetime)


def validate(bundle: PolicyBundle) -> None:
    """Everything a decision needs compiles; what `gateway policy sign` and `activate` check first."""
    compile_view(bundle, [])


def dev_jwks(settings: WorkerSettings) -> list[str]:
    """The dev issuer's public keys, trusted only where the settings say so (never in an enclave)."""
    path = jwks_path(Path(settings.keys_dir))
    return [path.read_text()] if settings.trust_dev_issuer and path.exists() else []


def for_worker(settings: WorkerSettings) -> Callable[[PolicyBundle], AuthzPolicy]:
    """The view function a worker's policy feed compiles each verified bundle with."""
    extra = dev_jwks(settings)
    return lambda bundle: compile_view(bundle, extra)
