"""The budget's view of the stream: rebuild the projection, catch up a team, write with CAS.

Concurrency control is JetStream's own (DESIGN §4): each ledger write carries
`Nats-Expected-Last-Subject-Sequence` over the team's ledger subjects, so a replica that did not
see another's write is refused (err_code 10071), catches up and decides again. No lock of ours.
"""

from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, NotFoundError

from ...schemas import codec, subjects
from ...schemas.events import BudgetReleased, BudgetReserved, BudgetSettled
from .. import bus
from .decider import BudgetState, evolve

WRONG_LAST_SEQUENCE = 10071
LedgerEvent = BudgetReserved | BudgetSettled | BudgetReleased


class LedgerConflict(Exception):
    """Another writer got to the team's ledger first."""


class LedgerStore:
    """The projection and the last ledger sequence seen per team."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.state = BudgetState()
        self.last_seq: dict[str, int] = {}

    async def rebuild(self) -> int:
        """Fold every ledger event in the stream; returns how many were read."""
        try:
            last = await self.js.get_last_msg(subjects.STREAM, "gw.evt.ledger.>", direct=True)
        except NotFoundError:
            return 0
        return await self._follow("gw.evt.ledger.>", until=int(last.seq or 0))

    async def catch_up(self, team: str) -> None:
        """Fold the team's ledger events this replica has not seen (one direct get when current)."""
        await self._follow(subjects.ledger_filter(team), until=None, team=team)

    async def _follow(self, filter_subject: str, until: int | None, team: str | None = None) -> int:
        seq = self.last_seq.get(team, 0) if team else 0
        count = 0
        while until is None or seq < until:
            try:
                raw = await self.js.get_msg(
                    subjects.STREAM, seq=seq + 1, subject=filter_subject, next=True, direct=True
                )
            except NotFoundError:
                break
            seq = int(raw.seq or 0)
            event = codec.decode_event(raw.data or b"")
            if isinstance(event, LedgerEvent):
                self.state = evolve(self.state, event)
                self.last_seq[event.team] = seq
                count += 1
        return count

    async def write(self, event: LedgerEvent) -> None:
        """Append a ledger event only if the team's ledger is where this replica last saw it."""
        team = event.team
        headers = {
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(self.last_seq.get(team, 0)),
            "Nats-Expected-Last-Subject-Sequence-Subject": subjects.ledger_filter(team),
        }
        try:
            seq = await bus.publish(self.js, event, headers=headers)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise LedgerConflict(str(exc)) from exc
            raise
        self.state = evolve(self.state, event)
        self.last_seq[team] = seq
