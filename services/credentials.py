"""Each identity's NATS credentials: an NKey seed (Ed25519) and the inbox prefix its permissions allow.

`gateway up` (and `gateway app add`) write `<data_dir>/creds/<name>.nk` with mode 0600; the server
configuration holds only the public keys, and connecting signs the server's nonce, so no secret is
in the configuration or on the wire (DESIGN §3).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from .registry import by_name


class Creds(msgspec.Struct, frozen=True, kw_only=True):
    """Where one identity's seed is, and its inbox prefix."""

    name: str
    seed_file: str
    inbox_prefix: str


def seed_path(creds_dir: Path, name: str) -> Path:
    """Where an identity's NKey seed lives."""
    return creds_dir / f"{name}.nk"


def load_creds(creds_dir: str, name: str) -> Creds | None:
    """The credentials of `name`, or None when the gateway runs without authentication."""
    if not creds_dir:
        return None
    path = seed_path(Path(creds_dir), name)
    if not path.exists():
        return None
    return Creds(name=name, seed_file=str(path), inbox_prefix=by_name(name).inbox_prefix)
