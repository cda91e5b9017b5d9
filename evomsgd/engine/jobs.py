"""The engine's one interface between its parts: what the dispatcher hands a worker, and what a
finished attempt reports back. Delivery flows one way: dispatcher -> `Job` -> worker ->
`Finished` -> dispatcher; neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomsgd.engine.lanes import Health
from evomsgd.ledger.records import Message

# A claimed message is the worker's this long past Evolution's timeout; then the dispatcher's
# sweeper takes it back (and the next send is flagged as a possible duplicate).
LEASE_MARGIN = 30.0


@dataclass(frozen=True, slots=True)
class Job:
    """One message to attempt, with what its lane knows that the attempt's rules need."""

    message_id: str
    instance: str
    # The instance has sent before: an "instance does not exist" answer then means it was
    # deleted (perhaps to be re-created and paired again), so the message waits out a grace
    # period instead of failing at once.
    instance_known: bool = False
    # The row as the dispatcher claimed it (STARTED, leased) at `started`; None only in the
    # reports of what never was a send (a cancel).
    message: Message | None = None
    started: float = 0.0


@dataclass(frozen=True, slots=True)
class LaneEffect:
    """What one outcome means for its lane."""

    health: Health | None = None  # new health, None to keep
    hold_for: float = 0.0  # seconds of rest (rate limit)
    reason: str | None = None
    # A probe asks Evolution for the instance's state directly, so it decides between blocking
    # states; a failed send only says that something is wrong.
    from_probe: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """A worker is done with a job: sent, failed, rescheduled, or not claimed at all."""

    job: Job
    final: bool = False  # the message reached a final status
    effect: LaneEffect | None = None
    sent: bool = False  # it was sent (outside sandbox mode): a first send starts the warm-up
