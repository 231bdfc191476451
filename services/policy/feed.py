"""Every worker follows the active policy on the stream.

At start a worker reads every stored `PolicyActivated`; afterwards a core subscription tells it
that a new one was published (each replica gets every activation, unlike a shared durable
consumer), and it reads the stream for it: an activation is applied only once it was read from the
stream, signed there by the operator identity, so every policy applied is in the record. It is
applied only when it was stored on the policy subject, a signer pinned in this worker's
configuration signed exactly its files, it was signed after the active one, and the worker's own
view compiles; otherwise it is logged and refused, and the active policy stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ...schemas import codec, subjects
from ...schemas.events import PolicyActivated
from ...schemas.policy import PolicyBundle
from ..bus import owner_of, stored_with_headers
from .bundle import PolicyError, bundle_from_files
from .signing import TrustedSigners, signing_time, verify_activation

log = logging.getLogger("enclave_gateway.policy")
V = TypeVar("V")
HISTORY_AGAIN_S = 1.0
# A live activation is looked for in the stream this many times (a direct get on a replicated
# stream may be answered by a follower that has not stored it yet) before it is refused.
LIVE_READS = 5


def verified_bundle(event: PolicyActivated, trusted: TrustedSigners) -> tuple[datetime, PolicyBundle]:
    """The signing time and the bundle of an activation a pinned signer signed; raises PolicyError."""
    signed = verify_activation(event, trusted)
    bundle = bundle_from_files(event.files)
    if bundle.version != event.version:
        raise PolicyError(f"policy claims version {event.version} but its content is {bundle.version}")
    return signed, bundle


def compile_activation(event: PolicyActivated, trusted: TrustedSigners, view: Callable[[PolicyBundle], V]) -> V:
    """Verify an activation, parse its bundle and compile one service's view of it; raises PolicyError."""
    return view(verified_bundle(event, trusted)[1])


def latest_valid(messages: list[tuple[bytes, str, int]], trusted: TrustedSigners) -> PolicyActivated | None:
    """The activation every worker decides under: validly signed by a pinned signer, latest signed time."""
    best: tuple[datetime, PolicyActivated] | None = None
    for data, subject, _ in messages:
        try:
            event = codec.decode_as(data, PolicyActivated, subject)
            signed, _ = verified_bundle(event, trusted)
        except (codec.DecodeError, PolicyError, msgspec.ValidationError):
            continue
        if best is None or signed > best[0]:
            best = (signed, event)
    return best[1] if best else None


class PolicyFeed(Generic[V]):
    """The policy this worker decides under, compiled to its own view and kept current.

    The active policy is the validly signed activation with the latest signing time this worker
    has seen on the policy subject; anything else that reaches it (unsigned, untrusted, tampered,
    older, junk the server was made to store, bytes pushed at the subscription from elsewhere) is
    logged and refused. A worker starting reads every activation in the stream and takes that one,
    so junk stored after it cannot keep a worker from starting.
    """

    def __init__(self, nc: Client, js: JetStreamContext, stage: str, view: Callable[[PolicyBundle], V],
                 trusted: TrustedSigners) -> None:
        self.nc, self.js, self.stage, self.view, self.trusted = nc, js, stage, view, dict(trusted)
        self._current: V | None = None
        self.version = ""
        self.signed_at: datetime | None = None
        self.refused = 0  # activations refused since start (tests read it)
        self._ready = asyncio.Event()
        self._read_through = 0  # the stream sequence of the last stored activation judged
        self._reading = asyncio.Lock()

    @property
    def current(self) -> V:
        """The active view (call after `start`)."""
        assert self._current is not None, "PolicyFeed.start() first"
        return self._current

    async def start(self, timeout_s: float = 60.0) -> None:
        """Subscribe first (no activation can slip between), then read every stored activation.

        Until one is active the history is read again each second: on a replicated stream the
        direct get that finds the newest activation may be answered by a follower that has not
        stored it yet (the server documents direct gets as possibly stale), and the activation it
        missed was published before the subscription, so only a later read brings it.
        """
        await self.nc.subscribe(subjects.policy_activated(), cb=self._on_msg)
        await self._read_history()
        if self._current is None:
            log.warning("%s: no valid signed policy is active yet; waiting for `gateway policy activate`", self.stage)
        async with asyncio.timeout(timeout_s):
            while not self._ready.is_set():
                try:
                    await asyncio.wait_for(self._ready.wait(), HISTORY_AGAIN_S)
                except TimeoutError:
                    try:
                        await self._read_history()
                    except (nats.errors.Error, TimeoutError) as exc:  # the bus is away: the next second tries again
                        log.debug("%s: reading the stored activations failed: %r", self.stage, exc)

    async def _read_history(self) -> set[bytes]:
        """Judge every stored activation not judged before; returns the bytes of every one stored."""
        async with self._reading:
            stored = await stored_with_headers(self.js, subjects.policy_activated(), self.stage)
            for data, subject, seq, headers in stored:
                if seq > self._read_through:  # a read again judges only what the last one did not see
                    self._read_through = seq
                    self._apply(data, subject, headers)
            return {data for data, _, _, _ in stored}

    async def _on_msg(self, msg: Msg) -> None:
        """A live activation is only a sign that one may have been stored: what is applied is read
        from the stream, so every policy a decision was made under is in the record. One published
        under a message id the stream had seen was never stored, and is never applied."""
        for attempt in range(LIVE_READS):
            try:
                if msg.data in await self._read_history():
                    return
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("%s: reading the stored activations failed: %r", self.stage, exc)
            await asyncio.sleep(HISTORY_AGAIN_S * (attempt + 1) / LIVE_READS)
        self.refused += 1
        log.error("%s: REFUSED a policy activation that is not in the stream; %s stays active", self.stage,
                  self.version or "none")

    def _apply(self, data: bytes, subject: str, headers: dict[str, str] | None) -> None:
        try:
            owner_of(self.js, subject, headers, data)  # stored by the operator's identity, not pushed there
            event = codec.decode_as(data, PolicyActivated, subject)  # bytes pushed from elsewhere keep their subject
            if event.version == self.version and event.signed_at and self.signed_at == signing_time(event.signed_at):
                return  # the one we already decide under
            signed, bundle = verified_bundle(event, self.trusted)
            if self.signed_at is not None and signed <= self.signed_at:
                raise PolicyError(f"signed at {signed.isoformat()}, not after the active policy's "
                                  f"{self.signed_at.isoformat()}: an old activation replayed")
            compiled = self.view(bundle)
        except (codec.DecodeError, PolicyError, msgspec.ValidationError) as exc:
            self.refused += 1
            log.error("%s: REFUSED a policy activation, %s stays active: %s", self.stage, self.version or "none", exc)
            return
        self._current, self.version, self.signed_at = compiled, event.version, signed
        log.info("%s: policy %s active (signed by %s at %s)", self.stage, event.version, event.signer, event.signed_at)
        self._ready.set()
