"""Load the policy bundle from a folder and name it by the sha256 of its files."""

from __future__ import annotations

import hashlib
import subprocess
import tomllib
from pathlib import Path

import msgspec

from ..schemas.policy import Budgets, Catalog, PolicyBundle

FILES = ("catalog.toml", "budgets.toml", "access_model.conf", "access_policy.csv")


class PolicyError(ValueError):
    """An invalid policy bundle; the message says which file and why."""


def bundle_digest(folder: Path) -> str:
    """sha256 over the bundle's files in a fixed order, names included."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return h.hexdigest()


def load_bundle(folder: Path) -> PolicyBundle:
    """Parse and validate the bundle; raises PolicyError with the file and the reason."""
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise PolicyError(f"policy bundle {folder} lacks {', '.join(missing)}")
    try:
        catalog = msgspec.convert(tomllib.loads((folder / "catalog.toml").read_text()), Catalog)
        budgets = msgspec.convert(tomllib.loads((folder / "budgets.toml").read_text()), Budgets)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PolicyError(f"{folder}: {exc}") from exc
    return PolicyBundle(
        version="sha256:" + bundle_digest(folder)[:16],
        catalog=catalog,
        budgets=budgets,
        access_model=(folder / "access_model.conf").read_text(),
        access_policy=(folder / "access_policy.csv").read_text(),
    )


def git_commit(folder: Path) -> str | None:
    """The commit the bundle was loaded from, when it lives in a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
