"""Facts about the policy bundle in force (DESIGN §2): the stream alone reproduces any decision."""

from .base import Event


class PolicyActivated(Event, frozen=True, kw_only=True, tag="PolicyActivated"):
    """A validated bundle became the one every worker decides under, with its full content.

    `signature`, `signer` and `signed_at` (added in issue 8, optional so earlier events still
    decode) are the policy signer's Ed25519 signature over the digest of `files` and the signing
    time, and the signer's key id. Workers refuse an activation that a signer pinned in their
    configuration did not sign, or that was signed before the one they decide under.
    """

    version: str
    sha256: str
    git_commit: str | None = None
    activated_by: str
    files: dict[str, str]
    signature: str | None = None
    signer: str | None = None
    signed_at: str | None = None  # signed with the digest: workers never go back to an older signature
    # The dev token issuer's public keys (JWKS), when the deployment trusts it and the dev signer signs
    # the activation: covered by the signature, so a dev token is verifiable from the stream alone.
    dev_issuers_jwks: str | None = None
