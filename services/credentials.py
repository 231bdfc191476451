"""Each service's NATS identity: user, password and the inbox prefix its permissions allow.

Written by `gateway up` into `<data_dir>/creds/<name>.creds.json` with mode 0600.
"""

from __future__ import annotations

from pathlib import Path

import msgspec


class Creds(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS user's credentials."""

    user: str
    password: str
    inbox_prefix: str


def creds_path(creds_dir: Path, name: str) -> Path:
    """Where a user's credentials file lives."""
    return creds_dir / f"{name}.creds.json"


def load_creds(creds_dir: str, name: str) -> Creds | None:
    """The credentials of `name`, or None when the gateway runs without authentication."""
    if not creds_dir:
        return None
    path = creds_path(Path(creds_dir), name)
    return msgspec.json.decode(path.read_bytes(), type=Creds) if path.exists() else None
