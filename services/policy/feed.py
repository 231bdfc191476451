"""Every worker follows the active policy on the stream (DESIGN §2-§3, issue 8).

At start a worker reads the newest `PolicyActivated` (one scoped direct get); afterwards it switches
on each new one, live, through a core subscription (each replica gets every activation, unlike a
shared durable consumer). An activation is applied only when a signer pinned in this worker's
configuration signed exactly its files and the worker's own view compiles; otherwise it is logged
and refused, and the active policy stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ...schemas import codec, subjects
from ...schemas.events import PolicyActivated
from ...schemas.policy import PolicyBundle
from .bundle import PolicyError, bundle_from_files
from .signing import TrustedSigners, verify_activation

log = logging.getLogger("enclave_gateway.policy")
V = TypeVar("V")


def compile_activation(event: PolicyActivated, trusted: TrustedSigners, view: Callable[[PolicyBundle], V]) -> V:
    """Verify an activation's signature, parse its bundle and compile one service's view of it.

    Raises PolicyError; the caller keeps its active policy.
    """
    verify_activation(event, trusted)
    bundle = bundle_from_files(event.files)
    if bundle.version != event.version:
        raise PolicyError(f"policy claims version {event.version} but its content is {bundle.version}")
    return view(bundle)


class PolicyFeed(Generic[V]):
    """The policy this worker decides under, compiled to its own view and kept current."""

    def __init__(self, nc: Client, js: JetStreamContext, stage: str, view: Callable[[PolicyBundle], V],
                 trusted: TrustedSigners) -> None:
        self.nc, self.js, self.stage, self.view, self.trusted = nc, js, stage, view, dict(trusted)
        self._current: V | None = None
        self.version = ""
        self.refused = 0  # activations refused since start (tests and `gateway status` read it)
        self._ready = asyncio.Event()

    @property
    def current(self) -> V:
        """The active view (call after `start`)."""
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
            if self._current is not None and event.version == self.version:
                return
            compiled = compile_activation(event, self.trusted, self.view)
        except (codec.DecodeError, PolicyError, msgspec.ValidationError) as exc:
            self.refused += 1
            log.error("%s: REFUSED a policy activation, %s stays active: %s", self.stage, self.version or "none", exc)
            return
        self._current, self.version = compiled, event.version
        log.info("%s: policy %s active (signed by %s)", self.stage, event.version, event.signer)
        self._ready.set()
