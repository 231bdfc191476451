"""Signed checkpoints of the audit hash chain. Pure: no bus, no clock.

The chain is `h_n = sha256(h_{n-1} || seq || subject || sha256(data))` over every stored message in
stream order (`decider.chain`), checkpoint messages included. A checkpoint is due after
`every_events` other messages, or after `every_s` seconds when at least one arrived, so an idle
stream is not filled with checkpoints of checkpoints.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from msgspec import Struct

from ...schemas import subjects
from ...schemas.events import AuditCheckpoint, envelope
from .. import keys
from ..keys import SignerKey
from .decider import GENESIS, chain

DOMAIN = b"enclave-gateway/audit-checkpoint/v1\n"


class Cursor(Struct, frozen=True, kw_only=True):
    """Where the chain stands, and the checkpoint it last vouched for."""

    seq: int = 0
    head: str = GENESIS
    checkpoint_seq: int = 0
    checkpoint_head: str = GENESIS
    pending: int = 0  # stored messages other than checkpoints since the last checkpoint


def advance(cursor: Cursor, seq: int, subject: str, data: bytes) -> Cursor:
    """Fold one stored message into the chain."""
    head = chain(cursor.head, seq, subject, hashlib.sha256(data).hexdigest())
    pending = cursor.pending + (0 if subject == subjects.audit_checkpoint() else 1)
    return Cursor(seq=seq, head=head, checkpoint_seq=cursor.checkpoint_seq, checkpoint_head=cursor.checkpoint_head,
                  pending=pending)


def due(cursor: Cursor, every_events: int, elapsed_s: float, every_s: float) -> bool:
    """Whether the chain as it stands should be checkpointed now."""
    return cursor.pending >= every_events or (cursor.pending > 0 and elapsed_s >= every_s)


def message(seq: int, head: str, previous_seq: int, previous_head: str) -> bytes:
    """What the audit signer signs: the domain tag and the chain position it vouches for."""
    return DOMAIN + f"{seq}\n{head}\n{previous_seq}\n{previous_head}".encode()


def signed_by(cp: AuditCheckpoint, signer: SignerKey) -> bool:
    """Whether `signer` signed exactly this checkpoint's chain position."""
    message = checkpoint_message(cp)
    return cp.signer == signer.kid and keys.valid(signer.public_key, cp.signature, message)


def checkpoint_message(cp: AuditCheckpoint) -> bytes:
    """The signing message of a recorded checkpoint."""
    return message(cp.seq, cp.head, cp.previous_seq, cp.previous_head)


def unsigned(cursor: Cursor) -> bytes:
    """The signing message of a checkpoint at the cursor."""
    return message(cursor.seq, cursor.head, cursor.checkpoint_seq, cursor.checkpoint_head)


def checkpoint(cursor: Cursor, signer: str, signature: str, now: datetime) -> AuditCheckpoint:
    """The checkpoint fact for the cursor, signed by `signer`."""
    return AuditCheckpoint(
        **envelope(f"audit-{cursor.seq}", "checkpoint", now, "n/a"),
        seq=cursor.seq,
        head=cursor.head,
        previous_seq=cursor.checkpoint_seq,
        previous_head=cursor.checkpoint_head,
        count=cursor.seq - cursor.checkpoint_seq,
        signer=signer,
        signature=signature,
    )


def vouched(cursor: Cursor, cp: AuditCheckpoint) -> Cursor:
    """The cursor once `cp` (at the cursor's own position) is the last checkpoint."""
    return Cursor(seq=cursor.seq, head=cursor.head, checkpoint_seq=cp.seq, checkpoint_head=cp.head, pending=0)


def resumed(cp: AuditCheckpoint) -> Cursor:
    """A cursor starting right after checkpoint `cp` (its message comes next in the stream)."""
    return Cursor(seq=cp.seq, head=cp.head, checkpoint_seq=cp.seq, checkpoint_head=cp.head)
