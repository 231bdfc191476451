"""Every worker follows the active policy on the stream (DESIGN §2, issue 4 item 5).

At start a worker reads the newest `PolicyActivated` (one direct get); afterwards it switches on
each new one, live, through a core subscription (each replica gets every activation, unlike a
shared durable consumer). A bundle that fails validation is refused and the active one stays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..schemas import codec, subjects
from ..schemas.events import PolicyActivated
from .authz.access import AccessRules
from .authz.decider import AuthzPolicy
from .authz.tokens import TokenCache, keyring
from .policy_store import PolicyError, bundle_from_files, digest
from .settings import WorkerSettings, jwks_path

log = logging.getLogger("enclave_gateway.policy")


def compile_policy(event: PolicyActivated, extra_jwks: list[str]) -> AuthzPolicy:
    """Validate an activation and build what deciders use; raises PolicyError."""
    if digest(event.files) != event.sha256:
        raise PolicyError(f"policy {event.version}: content does not match its sha256")
    bundle = bundle_from_files(event.files)
    if bundle.version != event.version:
        raise PolicyError(f"policy claims version {event.version} but its content is {bundle.version}")
    try:
        keys = keyring([bundle.issuers_jwks, *extra_jwks])
    except ValueError as exc:
        raise PolicyError(f"issuer keys: {exc}") from exc
    return AuthzPolicy(bundle=bundle, rules=AccessRules(bundle), keys=keys, tokens=TokenCache())


def dev_jwks(settings: WorkerSettings) -> list[str]:
    """The dev issuer's public keys, trusted only where the settings say so (never in an enclave)."""
    path = jwks_path(Path(settings.keys_dir))
    return [path.read_text()] if settings.trust_dev_issuer and path.exists() else []


class PolicyFeed:
    """The policy this worker decides under, kept current from the stream."""

    def __init__(self, nc: Client, js: JetStreamContext, stage: str, extra_jwks: list[str]) -> None:
        self.nc, self.js, self.stage, self.extra_jwks = nc, js, stage, extra_jwks
        self._current: AuthzPolicy | None = None
        self._ready = asyncio.Event()

    @property
    def current(self) -> AuthzPolicy:
        """The active policy (call after `start`)."""
        assert self._current is not None, "PolicyFeed.start() first"
        return self._current

    async def start(self, timeout_s: float = 60.0) -> None:
        """Subscribe first (no activation can slip between), then read the newest one."""
        await self.nc.subscribe(subjects.policy_activated(), cb=self._on_msg)
        try:
            raw = await self.js.get_last_msg(subjects.STREAM, subjects.policy_activated(), direct=True)
            self._apply(raw.data or b"")
        except NotFoundError:
            log.warning("%s: no policy is active yet; waiting for `gateway policy activate`", self.stage)
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def _on_msg(self, msg: Msg) -> None:
        self._apply(msg.data)

    def _apply(self, data: bytes) -> None:
        try:
            event = codec.decode_as(data, PolicyActivated)
            if self._current is not None and event.version == self._current.bundle.version:
                return
            self._current = compile_policy(event, self.extra_jwks)
        except (codec.DecodeError, PolicyError, msgspec.ValidationError) as exc:
            active = self._current.bundle.version if self._current else "none"
            log.error("%s: refused a policy activation, %s stays active: %s", self.stage, active, exc)
            return
        log.info("%s: policy %s active", self.stage, event.version)
        self._ready.set()
