"""Facts about the policy bundle in force (DESIGN §2): the stream alone reproduces any decision."""

from .base import Event


class PolicyActivated(Event, frozen=True, kw_only=True, tag="PolicyActivated"):
    """A validated bundle became the one every worker decides under, with its full content.

    `signature` and `signer` (added in issue 8, optional so earlier events still decode) are the
    policy signer's Ed25519 signature over the digest of `files` and the signer's key id. Workers
    refuse an activation that a signer pinned in their configuration did not sign.
    """

    version: str
    sha256: str
    git_commit: str | None = None
    activated_by: str
    files: dict[str, str]
    signature: str | None = None
    signer: str | None = None
