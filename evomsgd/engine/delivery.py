"""One delivery attempt: claim the message, call Evolution, record what the outcome means."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine.dispatcher import Dispatcher, LaneEffect
from evomsgd.engine.lanes import Health
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


def decide(
    msg: Message, outcome: SendOutcome, now: float, settings: Settings, rng: random.Random
) -> tuple[Transition, LaneEffect | None]:
    """The retry policy: what a send outcome does to the message and to its instance's lane."""
    kind = outcome.kind
    detail = outcome.reason
    if outcome.detail and outcome.detail not in detail:
        detail = f"{detail} (Evolution said: {outcome.detail})"

    def to(status: Status, text: str | None = detail, **changes: Any) -> Transition:
        return Transition(
            status, kind.value, text, outcome.http_status, error_kind=kind.value, **changes
        )

    if kind == OutcomeKind.SENT:
        sent = Transition(
            Status.SUCCESS,
            kind.value,
            None,
            outcome.http_status,
            evolution_key=outcome.key_id,
            remote_jid=outcome.remote_jid,
        )
        return sent, LaneEffect(health=Health.OPEN)
    if kind == OutcomeKind.SENT_UNCONFIRMED:
        return to(Status.SUCCESS), None  # WhatsApp has it: resending would duplicate it
    if kind in (OutcomeKind.PERMANENT, OutcomeKind.UNKNOWN_INSTANCE):
        return to(Status.FAILURE), None
    if kind == OutcomeKind.RATE_LIMITED:
        hold = settings.rate_limit_pause
        return to(Status.RETRY, next_attempt_at=now + hold), LaneEffect(
            hold_for=hold, reason=detail
        )
    if kind in (OutcomeKind.UPSTREAM_DOWN, OutcomeKind.CONFIG_ERROR):
        # Not the message's fault: it waits, without spending retries, until the lane resumes.
        health = Health.DOWN if kind == OutcomeKind.UPSTREAM_DOWN else Health.CONFIG_ERROR
        return to(Status.RETRY, next_attempt_at=now), LaneEffect(health=health, reason=detail)
    if kind == OutcomeKind.AMBIGUOUS:
        earlier = msg.ambiguous - msg.recovered  # a resend owed after a crash does not count
        if earlier < settings.ambiguous_retries:
            text = f"{detail} - it may have been delivered; one more try in {settings.ambiguous_delay:g}s"
            return to(
                Status.RETRY, text, next_attempt_at=now + settings.ambiguous_delay, ambiguous=True
            ), None
        text = f"{detail} - it may have been delivered; not sent again to avoid a duplicate"
        return to(Status.FAILURE, text, ambiguous=True), None
    # TRANSIENT: spend the retry budget.
    if msg.retries_used < settings.max_retries:
        delay = settings.retry_delay * settings.retry_backoff**msg.retries_used
        if settings.retry_jitter:
            delay += rng.uniform(0.0, settings.retry_jitter)
        return to(Status.RETRY, next_attempt_at=now + delay, spend_retry=True), None
    return to(
        Status.FAILURE, f"gave up after {msg.attempts} attempts: {detail}", spend_retry=True
    ), None


class Delivery:
    """Runs inside Huey worker threads; talks to Evolution through the event loop's client."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        sender: Sender,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        time_source: Callable[[], float] = clock.now,
        on_outcome: Callable[[Message, SendOutcome, Transition], None] | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.sender = sender
        self.loop = loop
        self.settings = settings
        self._time = time_source
        self._rng = random.Random()
        self._on_outcome = on_outcome

    def run(self, message_id: str, instance: str) -> None:
        """Deliver one message; always tells the dispatcher when done, whatever happens."""
        final, effect = False, None
        try:
            final, effect = self._attempt(message_id, instance)
        except Exception:
            log.exception(
                "task %s instance %s: delivery crashed; the lease sweeper will retry it",
                message_id,
                instance,
                extra=log_fields(message_id, instance),
            )
        finally:
            self.dispatcher.finished(instance, message_id, final, effect)

    def _attempt(self, message_id: str, instance: str) -> tuple[bool, LaneEffect | None]:
        if self.dispatcher.draining:
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
        transition, effect = decide(msg, outcome, now, self.settings, self._rng)
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
        if self._on_outcome is not None:
            self._on_outcome(msg, outcome, transition)
        _log_outcome(msg, outcome, transition)
        return transition.status in FINAL, effect

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
