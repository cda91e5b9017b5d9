"""One delivery attempt: claim the message, call Evolution, record what the outcome means."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine.jobs import Finished, Job, LaneEffect
from evomsgd.engine.rules import decide
from evomsgd.errors import StoreUnavailable
from evomsgd.evolution.client import Sender
from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome
from evomsgd.ledger.records import Message, Transition
from evomsgd.ledger.store import Store
from evomsgd.log import log_fields
from evomsgd.models import FINAL, Status

log = logging.getLogger("evomsgd.delivery")

# A worker owns a claimed message this long past Evolution's timeout; then the sweeper takes it back.
LEASE_MARGIN = 30.0


class Delivery:
    """Runs inside Huey worker threads; talks to Evolution through the event loop's client."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        report: Callable[[Finished], None],
        draining: Callable[[], bool] = lambda: False,
        time_source: Callable[[], float] = clock.now,
        on_outcome: Callable[[Message, SendOutcome, Transition], None] | None = None,
    ) -> None:
        self.store = store
        self._report = report
        self._draining = draining
        self.sender = sender
        self.loop = loop
        self.settings = settings
        self._time = time_source
        self._rng = random.Random()
        self._on_outcome = on_outcome

    def run(self, job: Job) -> None:
        """Deliver one message; always reports back when done, whatever happens."""
        final, effect = False, None
        try:
            final, effect = self._attempt(job)
        except Exception:
            log.exception(
                "task %s instance %s: delivery crashed; the lease sweeper will retry it",
                job.message_id,
                job.instance,
                extra=log_fields(job.message_id, job.instance),
            )
        finally:
            self._report(Finished(job, final, effect))

    def _attempt(self, job: Job) -> tuple[bool, LaneEffect | None]:
        message_id, instance = job.message_id, job.instance
        if self._draining():
            return False, None
        started = self._time()
        try:
            msg = self.store.claim(
                message_id, started, self.settings.evolution_timeout + LEASE_MARGIN
            )
        except StoreUnavailable as exc:
            log.warning(
                "task %s instance %s: cannot claim (%s); will retry",
                message_id,
                instance,
                exc,
                extra=log_fields(message_id, instance),
            )
            return False, None
        if msg is None:  # canceled, expired, or taken meanwhile
            return False, None
        assert msg.text is not None
        log.debug(
            "task %s instance %s: sending (attempt %s)",
            msg.id,
            msg.instance,
            msg.attempts,
            extra=log_fields(msg.id, msg.instance),
        )
        outcome = self._send(msg)
        now = self._time()
        transition, effect = decide(msg, outcome, now, self.settings, self._rng, job)
        try:
            self._record(msg, started, now, transition)
        except StoreUnavailable as exc:
            # The row stays STARTED with its lease: the next start (or the lease sweeper, if the
            # ledger comes back) sends it again, flagged as possibly delivered twice.
            log.error(
                "task %s instance %s: attempt %s ended %s, but the ledger cannot record it (%s); "
                "it will be sent again, flagged as a possible duplicate",
                msg.id,
                msg.instance,
                msg.attempts,
                outcome.kind.value,
                exc,
                extra=log_fields(msg.id, msg.instance),
            )
            return False, None
        if outcome.kind == OutcomeKind.SENT and not job.instance_known and not msg.sandbox:
            self._first_send(msg, now)
        if self._on_outcome is not None:
            self._on_outcome(msg, outcome, transition)
        _log_outcome(msg, outcome, transition)
        return transition.status in FINAL, effect

    def _first_send(self, msg: Message, now: float) -> None:
        """Record that the instance has sent, so a later "no such instance" waits out a grace."""
        try:
            self.store.mark_sent_once(msg.instance, now)
        except StoreUnavailable as exc:  # known again at its next success; nothing is lost
            log.warning("instance %s: cannot record its first send (%s)", msg.instance, exc)

    def _send(self, msg: Message) -> SendOutcome:
        assert msg.text is not None
        coro = self.sender.send_text(msg.instance, msg.phone, msg.text)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.settings.evolution_timeout + 5.0)
        except TimeoutError:
            future.cancel()
            return SendOutcome(OutcomeKind.AMBIGUOUS, "no answer from Evolution in time")

    def _record(self, msg: Message, started: float, now: float, transition: Transition) -> None:
        """Write the outcome; the send already happened, so keep trying while the ledger is busy."""
        delay = 0.05
        deadline = time.monotonic() + self.settings.evolution_timeout + LEASE_MARGIN / 2
        while True:
            try:
                if not self.store.finish_attempt(msg, started, now, transition):
                    log.warning(
                        "task %s instance %s: lease lost before the outcome was written",
                        msg.id,
                        msg.instance,
                        extra=log_fields(msg.id, msg.instance),
                    )
                return
            except StoreUnavailable as exc:
                # A read-only file system will not heal by waiting (it needs a remount), and a
                # worker that waits holds up the drain.
                if time.monotonic() > deadline or self.store.read_only_fs():
                    raise
                log.warning(
                    "task %s instance %s: ledger busy (%s); retrying the write",
                    msg.id,
                    msg.instance,
                    exc,
                    extra=log_fields(msg.id, msg.instance),
                )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def _log_outcome(msg: Message, outcome: SendOutcome, transition: Transition) -> None:
    took = f"{outcome.elapsed * 1000:.0f}ms"
    if outcome.http_status is not None:
        took = f"HTTP {outcome.http_status}, {took}"
    if transition.status == Status.SUCCESS:
        log.log(
            logging.WARNING if outcome.kind == OutcomeKind.SENT_UNCONFIRMED else logging.INFO,
            "task %s instance %s: sent (attempt %s, %s, key %s)",
            msg.id,
            msg.instance,
            msg.attempts,
            took,
            outcome.key_id,
            extra=log_fields(msg.id, msg.instance),
        )
    elif transition.status == Status.RETRY:
        log.warning(
            "task %s instance %s: attempt %s %s (%s): %s; next try at %s",
            msg.id,
            msg.instance,
            msg.attempts,
            outcome.kind.value,
            took,
            transition.detail,
            clock.to_rfc3339(transition.next_attempt_at or 0),
            extra=log_fields(msg.id, msg.instance),
        )
    else:
        log.error(
            "task %s instance %s: failed (%s): %s",
            msg.id,
            msg.instance,
            outcome.kind.value,
            transition.detail,
            extra=log_fields(msg.id, msg.instance),
        )
