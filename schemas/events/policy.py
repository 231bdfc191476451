"""Facts about the policy bundle in force (DESIGN §2): the stream alone reproduces any decision."""

from .base import Event


class PolicyActivated(Event, frozen=True, kw_only=True, tag="PolicyActivated"):
    """A validated bundle became the one every worker decides under, with its full content."""

    version: str
    sha256: str
    git_commit: str | None = None
    activated_by: str
    files: dict[str, str]
