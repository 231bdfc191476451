"""The broker's `authorization` block, derived from the registry of identities.

Every identity authenticates with an NKey: its seed stays 0600 in `<data_dir>/creds`, and the
server configuration holds only public keys. Applications are added and revoked at run time
(`gateway app add/remove`): their seeds are the list of applications, and a reload of the running
server applies the change (nats-server re-checks connected clients on reload).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable
from pathlib import Path

import msgspec
import nkeys

from .services import fact_signatures, registry
from .services.credentials import seed_path
from .services.keys import write_private

AUTH_FILE = "auth.conf"


def public_key(seed_file: Path) -> str:
    """The `U...` public key of a user seed."""
    return str(nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key.decode())


def ensure_seed(creds_dir: Path, name: str) -> Path:
    """An identity's seed, made once and kept across restarts."""
    path = seed_path(creds_dir, name)
    if not path.exists():
        write_private(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    return path


def apps(creds_dir: Path) -> tuple[str, ...]:
    """The applications that have an identity, by name."""
    return tuple(sorted(p.name.removeprefix("app.").removesuffix(".nk") for p in creds_dir.glob("app.*.nk")))


def identities(creds_dir: Path) -> list[registry.Identity]:
    """The fixed identities plus every application's."""
    return [*registry.fixed(), *(registry.application(a) for a in apps(creds_dir))]


def ensure_creds(creds_dir: Path, extra_apps: tuple[str, ...] = ()) -> list[registry.Identity]:
    """Seeds for every fixed identity (and the named applications); returns all identities."""
    for app in extra_apps:
        registry.application(app)  # validates the name before anything is written
        ensure_seed(creds_dir, f"app.{app}")
    for ident in registry.fixed():
        ensure_seed(creds_dir, ident.name)
    write_pins(creds_dir)
    return identities(creds_dir)


def write_pins(creds_dir: Path) -> Path:
    """The public key of every identity that signs facts (services/fact_signatures.py): what every
    reader of the stream checks a fact's signature against. Public, so not 0600."""
    pins = {i.name: public_key(seed_path(creds_dir, i.name)) for i in registry.fixed() if i.signs}
    path = fact_signatures.pins_path(creds_dir)
    text = msgspec.json.encode(pins)
    if not path.exists() or path.read_bytes() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(text)
        tmp.replace(path)
    return path


ENDPOINTS_FILE = "endpoints.json"  # every endpoint whose invokers' durable this deployment has


def endpoints(creds_dir: Path) -> tuple[str, ...]:
    """The endpoints whose durables the auth config protects."""
    try:
        return tuple(msgspec.json.decode((creds_dir / ENDPOINTS_FILE).read_bytes(), type=list[str]))
    except FileNotFoundError:
        return ()


def record_endpoints(creds_dir: Path, names: Iterable[str]) -> bool:
    """Add endpoints to the protected list; whether it grew (the auth config must then be rewritten)."""
    known = set(endpoints(creds_dir))
    grown = sorted(known | set(names))
    if len(grown) == len(known):
        return False
    write_private(creds_dir / ENDPOINTS_FILE, msgspec.json.encode(grown))
    return True


def authorization_block(creds_dir: Path) -> str:
    """The server config's `authorization { users: [...] }`: public NKeys and their permissions."""
    users = []
    protected = endpoints(creds_dir)
    for ident in identities(creds_dir):
        entry: dict[str, object] = {"nkey": public_key(seed_path(creds_dir, ident.name))}
        perms = registry.permissions(ident, protected)
        if perms is not None:
            entry["permissions"] = perms
        users.append(entry)
    # JSON is valid NATS config syntax, and quoting every subject avoids `$`/`>` surprises.
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"


def write_authorization(creds_dir: Path, conf_dir: Path) -> Path:
    """(Re)write the included `auth.conf` the broker's configuration includes."""
    path = conf_dir / AUTH_FILE
    write_private(path, authorization_block(creds_dir).encode())
    return path


def reload_broker(pid_file: Path) -> bool:
    """Ask the running nats-server to reload its configuration (SIGHUP); False when none runs."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def add_app(creds_dir: Path, app: str) -> Path:
    """A new application identity; returns its seed file."""
    registry.application(app)
    path = seed_path(creds_dir, f"app.{app}")
    if path.exists():
        raise FileExistsError(f"application {app!r} already exists ({path})")
    return ensure_seed(creds_dir, f"app.{app}")


def remove_app(creds_dir: Path, app: str) -> None:
    """Revoke an application: its seed goes, and with the next reload its connections."""
    path = seed_path(creds_dir, f"app.{app}")
    if not path.exists():
        raise FileNotFoundError(f"no application {app!r}")
    path.unlink()
