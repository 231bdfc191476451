"""Facts about the audit trail itself (DESIGN §6): signed checkpoints of the hash chain."""

from .base import Event


class AuditCheckpoint(Event, frozen=True, kw_only=True, tag="AuditCheckpoint"):
    """The auditor vouches for the chain over every stored message up to `seq`.

    `head` is h_seq of `h_n = sha256(h_{n-1} || seq || subject || sha256(data))` in stream order;
    `previous_seq` and `previous_head` name the checkpoint before it (0 and the genesis hash for
    the first), so the checkpoints form one chain an assessor walks offline. `signature` is the
    audit signer's Ed25519 signature over the checkpoint's fields (`signer` is its key id, derived
    from the key; the public key is in the register).
    """

    seq: int
    head: str
    previous_seq: int
    previous_head: str
    count: int  # stored messages folded since the previous checkpoint
    signer: str
    signature: str


class ConsoleViewed(Event, frozen=True, kw_only=True, tag="ConsoleViewed"):
    """Someone asked the web console for a page (issue 13): every view is a fact, refused ones too.

    `viewer` is the session token's subject (None: no valid session), with its team and roles;
    `page` names the page and `target` what it was asked about (a request id, a filter), bounded
    and never anything a prompt said; `status` is the HTTP status answered (403: the role does not
    allow the console).
    """

    viewer: str | None = None
    team: str | None = None
    roles: tuple[str, ...] = ()
    page: str
    target: str | None = None
    status: int
