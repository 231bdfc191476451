"""A deployment outside the repository (issue 11 item 3): `gateway init DIR` lays one out from
files shipped in the wheel, and `gateway up` checks one before it starts anything.

The policy bundle ships as package data mapped from the repository's `policies/` (pyproject
`package-dir`), so the bundle an operator starts from is byte for byte the one the tests run
against; `deployment_template/` holds only what a deployment adds around it.

Errors an operator causes here, each one line from `gateway` (cli.main):

    DeploymentError    the folder is not empty, a port is taken, no configuration file
    config.ConfigError the configuration file is unreadable or holds an unknown key (from preflight)
    PolicyError        the policy folder holds no valid bundle (from preflight)
"""

from __future__ import annotations

import os
import socket
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from . import config
from .policy_admin import validated_files
from .services.policy import FILES, SIGNATURE_FILE

POLICY_DIR = "policies"
DATA_DIR = "var"
DEFAULT_HTTP_PORT, DEFAULT_NATS_PORT = 8080, 4222  # the repository's gateway.toml


class DeploymentError(Exception):
    """A deployment cannot be laid out or started as it is; the message says what to do instead."""


def shipped_bundle() -> dict[str, bytes]:
    """The default policy bundle inside the installed package: exactly the bundle's files.

    A `bundle.sig` is never shipped or copied: it would name a signer the new deployment does not
    trust, and `gateway up` signs an unsigned bundle with the deployment's own dev signer.
    """
    folder = files("enclave_gateway") / POLICY_DIR
    return {name: folder.joinpath(name).read_bytes() for name in FILES if folder.joinpath(name).is_file()}


def _template(name: str) -> Traversable:
    return files("enclave_gateway") / "deployment_template" / name


def render(name: str, http_port: int, nats_port: int) -> str:
    """A shipped template with the deployment's ports filled in."""
    text = _template(name).read_text(encoding="utf-8")
    return Template(text).substitute(http_port=http_port, nats_port=nats_port)


def init(folder: Path, *, http_port: int = DEFAULT_HTTP_PORT, nats_port: int = DEFAULT_NATS_PORT,
         force: bool = False) -> list[Path]:
    """Write gateway.toml, README.md and the policy bundle into `folder`; returns what was written.

    A non-empty folder is refused without `force`: it may be a running deployment's, and
    overwriting its policy files would change what the next activation signs.
    """
    for what, port in (("--http-port", http_port), ("--nats-port", nats_port)):
        if not 0 < port < 65536:
            raise DeploymentError(f"{what} {port} is not a TCP port (1-65535)")
    if folder.exists() and not folder.is_dir():
        raise DeploymentError(f"{folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise DeploymentError(f"{folder} is not empty: choose a new folder, or pass --force to rewrite "
                              "its gateway.toml, README.md and policies/")
    bundle_dir = folder / POLICY_DIR
    targets = [folder / "gateway.toml", folder / "README.md", bundle_dir,
               *(bundle_dir / name for name in shipped_bundle())]
    linked = [str(t) for t in targets if t.is_symlink()]
    if linked:  # --force must not write through a link to files outside the deployment
        raise DeploymentError(f"refusing to write through symbolic links: {', '.join(linked)}")
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("gateway.toml", "README.md"):
            path = folder / name
            _write_new(path, render(name + ".template", http_port, nats_port).encode())
            written.append(path)
        for name, data in shipped_bundle().items():
            _write_new(bundle_dir / name, data)
            written.append(bundle_dir / name)
    except OSError as exc:
        raise DeploymentError(f"cannot lay out a deployment in {folder}: {exc.strerror or exc}") from exc
    # a signature left by --force signs the files just replaced: `up` would refuse the bundle
    (bundle_dir / SIGNATURE_FILE).unlink(missing_ok=True)
    return written


def _write_new(path: Path, data: bytes) -> None:
    """Write `path`, never following a link planted there since the check (O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def preflight(path: Path) -> config.GatewayConfig:
    """What `gateway up` needs before it starts a process: its configuration, a valid policy
    bundle, and free ports (a taken one otherwise surfaces as a child's exit, minutes in)."""
    if not path.is_file():
        raise DeploymentError(f"no configuration file {path}: pass --config FILE, or lay out a "
                              "deployment with `gateway init DIR`")
    cfg = config.load(path)  # raises ConfigError
    validated_files(Path(cfg.policy_dir))  # raises PolicyError, naming the folder and the file
    wanted = [("NATS", cfg.nats.host, cfg.nats.port, "[nats] port"),
              ("HTTP", cfg.http.host, cfg.http.port, "[http] port")]
    if cfg.engine.serve_tiny:
        wanted.append(("engine", "127.0.0.1", cfg.engine.port, "[engine] port"))
    for what, host, port, key in wanted:
        if port > 0:  # 0 (-1 for NATS): the server picks a free one
            _check_free(what, host, port, f"{key} in {path}")
    return cfg


def _check_free(what: str, host: str, port: int, key: str) -> None:
    """Raise DeploymentError when nothing could listen on host:port now.

    SO_REUSEADDR as nats-server and aiohttp set it, so a port left in TIME_WAIT by a gateway that
    just stopped is not called taken. Racy by nature: a port taken after this check still fails the
    start, later and less clearly.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DeploymentError(f"the {what} listener cannot bind {host}:{port} ({reason}): stop what holds it, "
                              f"or change {key}") from exc
