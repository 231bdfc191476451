"""The policy bundle: read from a folder, validated, named by sha256, and carried by PolicyActivated.

Validation builds everything a decision needs (catalog, budgets, labels, casbin rules, issuer
keys), so an invalid bundle is refused before it can be activated and the active one stays.
"""

from __future__ import annotations

import hashlib
import subprocess
import tomllib
from datetime import datetime
from pathlib import Path

import msgspec

from ..schemas.events import PolicyActivated, envelope
from ..schemas.labels import LabelError, parse_label
from ..schemas.policy import Budgets, Catalog, PolicyBundle

FILES = ("catalog.toml", "budgets.toml", "access_model.conf", "access_policy.csv", "issuers.jwks.json")


class PolicyError(ValueError):
    """An invalid policy bundle; the message says which file and why."""


def digest(files: dict[str, str]) -> str:
    """sha256 over the bundle's files in a fixed order, names included."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + files.get(name, "").encode() + b"\0")
    return h.hexdigest()


def read_files(folder: Path) -> dict[str, str]:
    """The bundle's files as text; raises PolicyError when one is missing."""
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise PolicyError(f"policy bundle {folder} lacks {', '.join(missing)}")
    return {name: (folder / name).read_text() for name in FILES}


def bundle_from_files(files: dict[str, str]) -> PolicyBundle:
    """Parse and validate a bundle; raises PolicyError naming the file and the reason."""
    missing = [n for n in FILES if n not in files]
    if missing:
        raise PolicyError(f"policy bundle lacks {', '.join(missing)}")
    try:
        catalog = msgspec.convert(tomllib.loads(files["catalog.toml"]), Catalog)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PolicyError(f"catalog.toml: {exc}") from exc
    try:
        budgets = msgspec.convert(tomllib.loads(files["budgets.toml"]), Budgets)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PolicyError(f"budgets.toml: {exc}") from exc
    bundle = PolicyBundle(
        version="sha256:" + digest(files)[:16],
        catalog=catalog,
        budgets=budgets,
        access_model=files["access_model.conf"],
        access_policy=files["access_policy.csv"],
        issuers_jwks=files["issuers.jwks.json"],
    )
    _validate(bundle)
    return bundle


def _validate(bundle: PolicyBundle) -> None:
    from .authz.access import AccessError, AccessRules
    from .authz.tokens import keyring

    ids = [m.id for m in bundle.catalog.model]
    if len(ids) != len(set(ids)):
        raise PolicyError("catalog.toml: duplicate model ids")
    for model in bundle.catalog.model:
        try:
            parse_label(model.accreditation)
        except LabelError as exc:
            raise PolicyError(f"catalog.toml: model {model.id!r} accreditation: {exc}") from exc
        if model.replacement is not None and model.replacement not in ids:
            raise PolicyError(f"catalog.toml: {model.id!r} is replaced by unknown model {model.replacement!r}")
    try:
        AccessRules(bundle)
    except AccessError as exc:
        raise PolicyError(f"access_model.conf/access_policy.csv: {exc}") from exc
    try:
        keyring([bundle.issuers_jwks])
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"issuers.jwks.json: {exc}") from exc


def load_bundle(folder: Path) -> PolicyBundle:
    """Read and validate the bundle in a folder."""
    return bundle_from_files(read_files(folder))


def git_commit(folder: Path) -> str | None:
    """The commit the bundle was loaded from, when it lives in a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def activation(folder: Path, activated_by: str, now: datetime) -> PolicyActivated:
    """The PolicyActivated fact for a folder's bundle; raises PolicyError when it is invalid."""
    files = read_files(folder)
    bundle = bundle_from_files(files)
    # The time is part of the id: re-activating an earlier version (a rollback) is a new fact.
    request_id = f"policy-{bundle.version}-{now.strftime('%Y%m%dT%H%M%S%f')}"
    return PolicyActivated(
        **envelope(request_id, "activate", now, bundle.version),
        version=bundle.version,
        sha256=digest(files),
        git_commit=git_commit(folder),
        activated_by=activated_by,
        files=files,
    )
