"""One delivery attempt: claim the message, call Evolution, record what the outcome means."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine.jobs import LEASE_MARGIN, Finished, Job
from evomsgd.engine.rules import decide
from evomsgd.engine.typist import typing_delay
from evomsgd.errors import StoreUnavailable
from evomsgd.evolution.client import OutgoingMedia, Sender
from evomsgd.evolution.lookups import found_outcome, match_sent, recipient_jid
from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.media import MediaFiles
from evomsgd.ledger.records import MediaRef, Message, Transition
from evomsgd.ledger.store import Store
from evomsgd.log import log_fields
from evomsgd.media import DEFAULT_STEM, to_base64
from evomsgd.models import FINAL, Status

log = logging.getLogger("evomsgd.delivery")

# Outcomes after which WhatsApp has the message from this instance.
SENT = (OutcomeKind.SENT, OutcomeKind.FOUND)


class Delivery:
    """One attempt per job: a Huey worker thread claims the message, the event loop sends it and
    records the outcome. A send waiting on the network holds no thread: the worker is free as
    soon as the send has started, so in-flight sends are bounded by EVOMSGD_MAX_IN_FLIGHT (the
    dispatcher's), not by the worker count."""

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        sender: Sender,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        report: Callable[[Finished], None],
        time_source: Callable[[], float] = clock.now,
        on_outcome: Callable[[Message, SendOutcome, Transition], None] | None = None,
    ) -> None:
        self.store = store
        self.committer = committer
        self._report = report
        self.sender = sender
        self.loop = loop
        self.settings = settings
        self._time = time_source
        self._rng = random.Random()
        self._on_outcome = on_outcome
        self._tasks: set[asyncio.Task[None]] = set()
        self.media_files = MediaFiles(store.data_dir)

    # -- in a Huey worker thread ----------------------------------------------------------

    def run(self, jobs: list[Job]) -> None:
        """Start the sends of claimed jobs on the event loop; the thread is free at once."""
        for job in jobs:
            if job.message is not None:
                log.debug(
                    "task %s instance %s: sending (attempt %s)",
                    job.message_id,
                    job.instance,
                    job.message.attempts,
                    extra=log_fields(job.message_id, job.instance),
                )
        self.loop.call_soon_threadsafe(self._start, jobs)

    # -- on the event loop ----------------------------------------------------------------

    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.message is None:  # not a send (nothing claimed): nothing to do but say so
                self._report(Finished(job))
                continue
            task = self.loop.create_task(self._attempt(job, job.message, job.started))
            self._tasks.add(task)  # a task nobody references may be collected mid-send
            task.add_done_callback(self._tasks.discard)

    def abandon(self) -> int:
        """Cancel sends still in flight at the end of the drain; their rows stay STARTED and the
        next start sends them again, flagged as possible duplicates. Returns how many."""
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        return len(pending)

    async def _attempt(self, job: Job, msg: Message, started: float) -> None:
        """Send, decide, record; always reports back, whatever happens."""
        final, effect, sent = False, None, False
        try:
            outcome, looked_up = None, None
            if msg.ambiguous and not msg.sandbox:
                outcome, looked_up = await self._look_up(msg)
            if outcome is None:
                outcome = await self._send(msg)
            now = self._time()
            transition, effect = decide(msg, outcome, now, self.settings, self._rng, job)
            transition.lookup = looked_up
            if await self._record(msg, started, now, transition, outcome):
                sent = outcome.kind in SENT and not msg.sandbox
                if sent and not job.instance_known:
                    self._first_send(msg, now)
                if self._on_outcome is not None:
                    self._on_outcome(msg, outcome, transition)
                _log_outcome(msg, outcome, transition)
                final = transition.status in FINAL
            else:
                effect = None
        except Exception:
            _crashed(job)
        finally:
            self._report(Finished(job, final, effect, sent))

    def _first_send(self, msg: Message, now: float) -> None:
        """Record that the instance has sent, so a later "no such instance" waits out a grace."""
        store, instance = self.store, msg.instance

        def failed(future: concurrent.futures.Future[None]) -> None:
            if future.exception() is not None:  # known again at its next success
                log.warning(
                    "instance %s: cannot record its first send (%s)", instance, future.exception()
                )

        self.committer.write(lambda cur: store.mark_sent_in(cur, instance, now)).add_done_callback(
            failed
        )

    async def _look_up(self, msg: Message) -> tuple[SendOutcome | None, str | None]:
        """Before resending a message an earlier attempt may have sent: does Evolution have it?
        (FOUND, None) when it does; else (None, what the look-up said), and it is sent."""
        assert msg.text is not None
        started = time.monotonic()
        try:
            facts = await asyncio.to_thread(self.store.lookup_facts, msg)
        except StoreUnavailable as exc:
            return None, f"could not look it up ({exc}); sent again"
        jid = recipient_jid(msg.phone, facts.integration)
        answer = await self.sender.find_messages(msg.instance, jid)
        if not answer.ok:
            return None, f"could not look it up in Evolution ({answer.reason}); sent again"
        matches = match_sent(answer.data, msg.text, facts.since, facts.taken)
        if not matches:
            return None, (
                f"not among Evolution's messages to {jid} since "
                f"{clock.to_rfc3339(facts.since)}; sent again"
            )
        return found_outcome(matches, elapsed=time.monotonic() - started), None

    async def _send(self, msg: Message) -> SendOutcome:
        assert msg.text is not None
        outgoing: OutgoingMedia | None = None
        if msg.media is not None:
            prepared = await self._outgoing(msg.media, msg.text)
            if isinstance(prepared, SendOutcome):
                return prepared
            outgoing = prepared
        typing = outgoing is None and self.settings.lane(msg.instance).typing
        delay = typing_delay(msg.text, self._rng) if typing else 0.0
        try:
            async with asyncio.timeout(self.settings.evolution_timeout + delay + 5.0):
                if outgoing is not None:
                    return await self.sender.send_media(msg.instance, msg.phone, outgoing)
                return await self.sender.send_text(msg.instance, msg.phone, msg.text, delay=delay)
        except TimeoutError:
            return SendOutcome(OutcomeKind.AMBIGUOUS, "no answer from Evolution in time")

    async def _outgoing(self, media: MediaRef, caption: str) -> OutgoingMedia | SendOutcome:
        """What sendMedia gets: the URL, or the stored file in base64 (read and encoded in a
        thread: a 16 MiB file would hold the loop); a PERMANENT outcome when the file is gone."""
        if media.url is not None:
            source = media.url
        else:
            assert media.sha256 is not None
            try:
                source = await asyncio.to_thread(_base64_of, self.media_files, media.sha256)
            except OSError as exc:
                return SendOutcome(
                    OutcomeKind.PERMANENT,
                    f"the media file {media.sha256[:12]}... is missing from the data "
                    f"directory ({type(exc).__name__}) - send the message again with its file",
                )
        return OutgoingMedia(
            media.kind,
            source,
            media.filename or DEFAULT_STEM.get(media.kind, "file"),
            media.mimetype,
            caption,
        )

    async def _record(
        self, msg: Message, started: float, now: float, tr: Transition, outcome: SendOutcome
    ) -> bool:
        """Write the outcome; the send already happened, so keep trying while the ledger is busy.
        False when it cannot be written: the row stays STARTED with its lease, and the next start
        (or the lease sweeper, if the ledger comes back) sends it again, flagged."""
        store = self.store
        delay = 0.05
        deadline = time.monotonic() + self.settings.evolution_timeout + LEASE_MARGIN / 2
        while True:
            try:
                done = self.committer.write_soon(
                    lambda cur: store.finish_in(cur, msg, started, now, tr)
                )
                if not await done:
                    log.warning(
                        "task %s instance %s: lease lost before the outcome was written",
                        msg.id,
                        msg.instance,
                        extra=log_fields(msg.id, msg.instance),
                    )
                return True
            except StoreUnavailable as exc:
                # A read-only file system will not heal by waiting (it needs a remount), and a
                # send that waits holds up the drain.
                if time.monotonic() > deadline or await asyncio.to_thread(store.read_only_fs):
                    log.error(
                        "task %s instance %s: attempt %s ended %s, but the ledger cannot record "
                        "it (%s); it will be sent again, flagged as a possible duplicate",
                        msg.id,
                        msg.instance,
                        msg.attempts,
                        outcome.kind.value,
                        exc,
                        extra=log_fields(msg.id, msg.instance),
                    )
                    return False
                log.warning(
                    "task %s instance %s: ledger busy (%s); retrying the write",
                    msg.id,
                    msg.instance,
                    exc,
                    extra=log_fields(msg.id, msg.instance),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


def _base64_of(files: MediaFiles, sha256: str) -> str:
    return to_base64(files.read(sha256))


def _crashed(job: Job) -> None:
    """A bug in an attempt: logged with its traceback; the row's lease brings the message back."""
    log.exception(
        "task %s instance %s: delivery crashed; the lease sweeper will retry it",
        job.message_id,
        job.instance,
        extra=log_fields(job.message_id, job.instance),
    )


def _log_outcome(msg: Message, outcome: SendOutcome, transition: Transition) -> None:
    took = f"{outcome.elapsed * 1000:.0f}ms"
    if outcome.http_status is not None:
        took = f"HTTP {outcome.http_status}, {took}"
    if outcome.kind == OutcomeKind.FOUND:
        log.info(
            "task %s instance %s: found in Evolution, not sent again (attempt %s, key %s)",
            msg.id,
            msg.instance,
            msg.attempts,
            outcome.key_id,
            extra=log_fields(msg.id, msg.instance),
        )
    elif transition.status == Status.SUCCESS:
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
