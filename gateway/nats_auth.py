"""Least privilege on the bus (DESIGN §3, issue 4 item 6): one NATS user per service and one for
applications, each allowed to publish only the subjects it owns.

The server itself refuses a forged `RequestAuthorized` from an application: nothing reaches the
stream. Passwords are random, stored 0600 in the data dir, and only their bcrypt hashes go into
the server config. Permissions follow shared/notes/nats-permissions.md (checked on nats-server 2.15).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import bcrypt

from .services.credentials import Creds, creds_path

STREAM = "GW_EVENTS"
SERVICES = ("edge", "authz", "budget", "router", "invoker", "auditor")
USERS = ("admin", "app", "soc", *SERVICES)
OWN_EVENTS: dict[str, tuple[str, ...]] = {
    "edge": ("gw.evt.request.submitted", "gw.evt.response.delivered", "_INBOX_app.>", "_INBOX_edge.>"),
    "authz": ("gw.evt.request.authorized.*", "gw.evt.request.denied.*"),
    "budget": ("gw.evt.ledger.*.*", "gw.evt.budget.rejected.*"),
    "router": ("gw.evt.route.selected.*", "gw.evt.route.unavailable.*"),
    "invoker": ("gw.evt.invocation.completed.*", "gw.evt.invocation.failed.*"),
    "auditor": (),
}


def permissions(user: str) -> dict[str, dict[str, list[str]]] | None:
    """The publish/subscribe allow lists of a user; None (everything) for admin only."""
    if user == "admin":
        return None
    if user == "app":
        return {"publish": {"allow": ["gw.submit"]}, "subscribe": {"allow": ["_INBOX_app.>"]}}
    if user == "soc":  # the violations feed, live, and nothing else
        return {"publish": {"allow": []}, "subscribe": {"allow": ["gw.evt.request.denied.>", "_INBOX_soc.>"]}}
    publish = [
        *OWN_EVENTS[user],
        "gw.evt.message.rejected",  # any stage may record bytes it could not decode
        "gw.evt.request.failed",  # any stage may give up after max_deliver
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{user}",  # fetch from its own durable only
        f"$JS.ACK.{STREAM}.{user}.>",
        f"$JS.API.DIRECT.GET.{STREAM}",  # the newest policy, the budget's catch-up reads
        f"$JS.API.DIRECT.GET.{STREAM}.>",
    ]
    if user == "budget":
        publish += [
            # the projection's rebuild: an ordered consumer over the ledger, from the snapshot on
            f"$JS.API.CONSUMER.CREATE.{STREAM}",
            f"$JS.API.CONSUMER.CREATE.{STREAM}.>",
            f"$JS.API.CONSUMER.DELETE.{STREAM}.>",
            f"$JS.FC.{STREAM}.>",
            # snapshots in the object store GW_BUDGET (chunks, metadata, and its own readers)
            "$O.GW_BUDGET.>",
            "$JS.API.STREAM.INFO.OBJ_GW_BUDGET",
            "$JS.API.STREAM.PURGE.OBJ_GW_BUDGET",
            "$JS.API.STREAM.MSG.GET.OBJ_GW_BUDGET",
            "$JS.API.DIRECT.GET.OBJ_GW_BUDGET",
            "$JS.API.DIRECT.GET.OBJ_GW_BUDGET.>",
            "$JS.API.CONSUMER.CREATE.OBJ_GW_BUDGET",
            "$JS.API.CONSUMER.CREATE.OBJ_GW_BUDGET.>",
            "$JS.API.CONSUMER.DELETE.OBJ_GW_BUDGET.>",
            "$JS.FC.OBJ_GW_BUDGET.>",
            "$JS.API.STREAM.NAMES",  # nats-py's object-store reader looks its stream up by subject
        ]
    subscribe = [f"_INBOX_{user}.>", "gw.evt.policy.activated"]
    if user == "edge":
        subscribe.append("gw.submit edge")  # only as queue group `edge`
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_creds(creds_dir: Path) -> dict[str, Creds]:
    """Every user's credentials, created once and kept across restarts."""
    out: dict[str, Creds] = {}
    for user in USERS:
        path = creds_path(creds_dir, user)
        if not path.exists():
            creds = Creds(user=user, password=secrets.token_urlsafe(24), inbox_prefix=f"_INBOX_{user}")
            _write_private(
                path, json.dumps({"user": creds.user, "password": creds.password, "inbox_prefix": creds.inbox_prefix})
            )
        data = json.loads(path.read_text())
        out[user] = Creds(user=data["user"], password=data["password"], inbox_prefix=data["inbox_prefix"])
    return out


def authorization_block(creds: dict[str, Creds]) -> str:
    """The server config's `authorization { users: [...] }` with bcrypt hashes."""
    users = []
    for user, c in creds.items():
        entry: dict[str, object] = {
            "user": user,
            "password": bcrypt.hashpw(c.password.encode(), bcrypt.gensalt(11)).decode(),
        }
        perms = permissions(user)
        if perms is not None:
            entry["permissions"] = perms
        users.append(entry)
    # JSON is valid NATS config syntax, and quoting every subject avoids `$`/`>` surprises.
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"
