"""The dispatcher: hands due messages to the workers, one lane at a time, and keeps house.

It is the only thread that decides *when* a message is sent. It wakes when the API accepts a
message, when a worker finishes, when a probe answers, or when the next timer is due (a paced
send, a scheduled message, a retry, an expiry); it never polls on a fixed beat for work.

Why it is one module of about 850 lines: it is one state machine under one lock - the lanes,
the timer heap, the in-flight count, the probes and the views read and change the same state, and
each entry point takes the lock for a few lines. Split across files, every part would reach into
the others' fields; what could stand alone already does (the lane's arithmetic in lanes.py, the
rules in rules.py, quiet hours in quiet.py, typing in typist.py, the interface in jobs.py, the
queries in ledger/deliveries.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import heapq
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine.jobs import LEASE_MARGIN, Finished, Job, LaneEffect
from evomsgd.engine.lanes import DAY, Health, Lane, day_start
from evomsgd.engine.quiet import Hold, hold_for
from evomsgd.engine.rules import probe_effect
from evomsgd.engine.typist import MAX_DELAY
from evomsgd.errors import StoreUnavailable
from evomsgd.evolution.outcomes import StateProbe
from evomsgd.ledger.records import Message
from evomsgd.ledger.store import Store
from evomsgd.log import log_fields
from evomsgd.models import LaneView, QuietEnd, Status

log = logging.getLogger("evomsgd.dispatcher")

Submit = Callable[[list[Job]], None]
# Claim these ids (compare-and-set to STARTED under a lease of `lease` seconds) at `now`, in one
# transaction; a row each, None for one that was canceled, expired or taken meanwhile.
Claim = Callable[[list[str], float, float], list["Message | None"]]
Probe = Callable[[str], "concurrent.futures.Future[StateProbe]"]
# Hold these messages, each (id, instance, until, why), in one transaction at `now`: quiet hours
# where their recipients live (Deliveries.hold_in).
HoldWrite = Callable[[list[tuple[str, str, float, str]], float], int]
# (instance, paused, reason, now): health paused or resumed a lane. Called under the lock: it
# must only queue a write, never wait for one.
Announce = Callable[[str, bool, str, float], None]

HOUSEKEEPING_EVERY = 1.0
# A lane with quiet hours reads this many due messages beyond its room: those whose recipients
# are in their night are held (one write) and the rest sent, instead of one held per step.
QUIET_SCAN = 256
_MAX_WAIT = 5.0
# Sends an unpaced lane keeps in flight while the loop is busy (the API is accepting, or the
# loop runs late). The API and the sends share one event loop: with a fast Evolution every send
# in flight is a callback queued ahead of the next POST, so a lane with 1,024 in flight made a
# 202 wait 400 ms. 32 fill a fast server (the fake's own ceiling is measured at 32
# connections); more only queue in the loop. Once the loop is idle again the bound grows back by
# as much per step, up to EVOMSGD_MAX_IN_FLIGHT (a slow Evolution needs many in flight).
BUSY_IN_FLIGHT = 32


@dataclass(slots=True)
class _Plan:
    """One lane's part of a step: the ids it took (in flight, to be claimed), or when to look
    again when it could take none."""

    lane: Lane
    taken: list[str] = field(default_factory=list)
    known: bool = False
    short: bool = False  # fewer were due than there was room for
    wake: float | None = None
    holds: list[tuple[str, str, float, str]] = field(default_factory=list)  # quiet hours


class Dispatcher:
    """Per-instance lanes over the ledger; thread-safe entry points, one loop thread."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        submit: Submit,
        probe: Probe | None = None,
        *,
        claim: Claim | None = None,
        hold: HoldWrite | None = None,
        time_source: Callable[[], float] = clock.now,
        rng: random.Random | None = None,
        busy: Callable[[], bool] = lambda: False,
        announce: Announce | None = None,
    ) -> None:
        self.store = store
        # Tells the apps (instance.* callbacks) when health pauses or resumes a lane.
        self._announce = announce or (lambda instance, paused, reason, now: None)
        self._busy = busy  # the event loop is accepting messages or runs late (BUSY_IN_FLIGHT)
        self._unpaced_room = BUSY_IN_FLIGHT  # in flight an unpaced lane may have now
        self._claim = claim or self._claim_directly
        self._hold = hold or self._hold_directly
        self.settings = settings
        self._submit = submit
        self._probe = probe
        self._time = time_source
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._lanes: dict[str, Lane] = {}
        self._known: set[str] = set()  # instances that have sent (from the ledger at start)
        self._first_sends: dict[str, float] = {}  # instance -> its first send (the ledger's)
        # Work per event is O(log lanes): a step looks only at the lanes an event touched
        # (_dirty) and those whose timer is due (_timers: a heap of (time, instance), stale
        # entries skipped lazily against Lane.wake_at), never at every lane.
        self._dirty: set[str] = set()
        self._timers: list[tuple[float, str]] = []
        self._starved: set[str] = set()  # lanes with work waiting for in-flight room
        self._in_flight = 0  # sends handed out and not finished, all lanes
        self._stopping = False
        self._draining = False
        self._next_housekeeping = 0.0
        self._changed = False
        self._thread: threading.Thread | None = None

    def _claim_directly(self, ids: list[str], now: float, lease: float) -> list[Message | None]:
        """Claim in one transaction on the store itself (without a group committer: tests)."""
        store = self.store
        with store.transaction() as cur:
            return [store.claim_in(cur, message_id, now, lease) for message_id in ids]

    def _hold_directly(self, holds: list[tuple[str, str, float, str]], now: float) -> int:
        """Hold in one transaction on the store itself (without a group committer: tests)."""
        with self.store.transaction() as cur:
            return self.store.hold_in(cur, holds, now)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load lanes from the ledger and start the loop thread."""
        self.reload_lanes()
        self._thread = threading.Thread(target=self._run, name="evomsgd-dispatcher", daemon=True)
        self._thread.start()

    def reload_lanes(self) -> None:
        """Rebuild lane state from the ledger (waiting counts, operator pauses, recent sends)."""
        now = self._time()
        waiting = self.store.waiting_by_instance()
        paused = self.store.paused_lanes()
        first = self.store.first_sends()
        instances = set(waiting) | set(paused) | set(self.settings.instances)
        if self.settings.warmup_days or self.settings.new_contacts_per_day:
            instances |= set(first)  # a default budget applies to every instance that sent
        with self._cond:
            self._known, self._first_sends = set(first), first
            for lane in self._lanes.values():
                lane.known = lane.known or lane.instance in first
                lane.first_sent_at = lane.first_sent_at or first.get(lane.instance)
            for instance in instances:
                lane = self._lane(instance)
                lane.waiting = waiting.get(instance, (0, None))[0]
                lane.operator_paused = instance in paused
                lane.operator_reason = paused.get(instance)
                self._dirty.add(lane.instance)
                if any(
                    getattr(lane.settings, cap)
                    for cap in ("per_minute", "per_hour", "per_day", "warmup_days")
                ):
                    lane.sends.extend(self.store.attempt_times(instance, now - 86_400.0))
                if lane.settings.new_contacts_per_day:
                    lane.new_contacts_day = day_start(now)
                    lane.new_contacts = self.store.new_contacts_since(instance, day_start(now))
                if lane.settings.quiet_hours:
                    self._reload_quiet(lane, now)
            self._notify()

    def _reload_quiet(self, lane: Lane, now: float) -> None:
        """The lane's messages held by quiet hours, from the ledger, for the views (caller
        holds the lock)."""
        for message_id, phone, priority, until in self.store.held_quiet(lane.instance, now):
            hold = hold_for(phone, priority, lane.settings, now)
            if hold is not None:  # still night there: its zone; the ledger's end
                lane.quiet_held[message_id] = Hold(until, hold.zone)

    def drain(self) -> None:
        """Stop handing out work; in-flight sends continue."""
        with self._cond:
            self._draining = True
            self._notify()

    @property
    def draining(self) -> bool:
        return self._draining

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop thread."""
        with self._cond:
            self._stopping = True
            self._notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no send is in flight; False if the timeout ran out first."""
        deadline = self._time() + timeout
        with self._cond:
            while any(lane.in_flight for lane in self._lanes.values()):
                left = deadline - self._time()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def in_flight(self) -> int:
        with self._cond:
            return sum(len(lane.in_flight) for lane in self._lanes.values())

    # -- events from the API and the workers ----------------------------------------------

    def accepted(self, instances: dict[str, int]) -> None:
        """New messages were committed: wake their lanes."""
        with self._cond:
            for instance, count in instances.items():
                lane = self._lane(instance)
                lane.waiting += count
                self._dirty.add(lane.instance)
            self._notify()

    def finished(self, report: Finished) -> None:
        """A worker is done with a job (sent, failed, rescheduled, or not claimed)."""
        now = self._time()
        with self._cond:
            lane = self._lane(report.job.instance)
            self._release(lane, report.job.message_id)
            lane.quiet_held.pop(report.job.message_id, None)
            if report.sent and lane.first_sent_at is None:
                lane.first_sent_at = now  # the warm-up's day 1 (the ledger records it too)
            if report.final:
                lane.waiting = max(0, lane.waiting - 1)
            self._dirty.add(lane.instance)
            if report.effect is not None:
                self._apply(lane, report.effect, now)
            self._notify()

    def set_operator_pause(self, instance: str, paused: bool, reason: str | None) -> None:
        """Pause or resume a lane (the caller has written it to the ledger)."""
        with self._cond:
            lane = self._lane(instance)
            lane.operator_paused = paused
            lane.operator_reason = reason
            self._dirty.add(lane.instance)
            self._notify()

    def reported_state(self, instance: str, report: StateProbe) -> None:
        """An instance's state reported from outside (Evolution's connection.update webhook),
        applied at once as a probe's answer would be; an instance without a lane is left alone."""
        now = self._time()
        with self._cond:
            lane = self._lanes.get(instance)
            if lane is None:
                return
            effect = probe_effect(report, lane.known)
            if effect is not None:
                self._apply(lane, effect, now)
            self._dirty.add(lane.instance)
            self._notify()

    def _apply(self, lane: Lane, effect: LaneEffect, now: float) -> None:
        if effect.reason:
            lane.last_error, lane.last_error_at = effect.reason, now
        if effect.hold_for:
            lane.held_until = max(lane.held_until, now + effect.hold_for)
            log.warning(
                "instance %s rests %.0fs: %s",
                lane.instance,
                effect.hold_for,
                effect.reason,
                extra=log_fields(instance=lane.instance),
            )
        health = effect.health
        if health == Health.OPEN:
            lane.known = lane.known or not effect.from_probe
            if lane.last_error_at is not None and (lane.recovered_at or 0.0) < lane.last_error_at:
                lane.recovered_at = now
        if health is None or health == lane.health:
            return
        if lane.blocking and health != Health.OPEN and not effect.from_probe:
            # The lane is already paused and probing: the probe, which asks Evolution for the
            # instance's state, says which kind of pause it is. A failed send changing it would
            # make the log flap between two words for one problem.
            return
        was_blocking = lane.blocking
        lane.health = health
        if health == Health.UNKNOWN_INSTANCE:
            lane.missing_since = now
        else:
            lane.missing_since = None
        if lane.blocking:
            lane.probe_backoff = min(1.0, self.settings.probe_interval)
            lane.next_probe_at = now + lane.probe_backoff
            log.warning(
                "instance %s paused (%s): %s",
                lane.instance,
                health,
                effect.reason,
                extra=log_fields(instance=lane.instance),
            )
            if not was_blocking:
                self._announce(lane.instance, True, f"{health}: {effect.reason or health}", now)
        elif was_blocking:
            log.info(
                "instance %s resumed (%s)",
                lane.instance,
                health,
                extra=log_fields(instance=lane.instance),
            )
            self._announce(lane.instance, False, f"{health}", now)

    def _release(self, lane: Lane, message_id: str) -> None:
        """A send is no longer in flight: free its room, and wake lanes that waited for room."""
        if message_id in lane.in_flight:
            lane.in_flight.discard(message_id)
            self._in_flight -= 1
            if self._starved:
                self._dirty |= self._starved
                self._starved.clear()

    def _schedule(self, lane: Lane, at: float) -> None:
        """Look at the lane again at `at` (caller holds the lock)."""
        if at < lane.wake_at:
            lane.wake_at = at
            heapq.heappush(self._timers, (at, lane.instance))

    def _notify(self) -> None:
        """Wake the loop (caller holds the lock)."""
        self._changed = True
        self._cond.notify_all()

    def _lane(self, instance: str) -> Lane:
        lane = self._lanes.get(instance)
        if lane is None:
            settings = self.settings.lane(instance)
            # A paced lane sends one at a time; an unpaced one as many as the in-flight bound allows
            # (one per recipient: the ledger holds later messages to a recipient back).
            paced = (settings.send_interval or 0) > 0
            concurrency = 1 if paced else self.settings.max_in_flight
            lane = Lane(
                instance=instance,
                settings=settings,
                concurrency=concurrency,
                unknown_grace=self.settings.unknown_instance_grace,
                known=instance in self._known,
                first_sent_at=self._first_sends.get(instance),
                # Lanes made together (a start with a backlog on 1,000 instances) must not all
                # probe Evolution in the same instant; an unprobed lane may send meanwhile.
                next_probe_at=self._time()
                + self._rng.uniform(0.0, min(self.settings.probe_interval, 5.0)),
            )
            self._lanes[instance] = lane
        return lane

    def _unpaced_bound(self) -> int:
        """BUSY_IN_FLIGHT while the loop is busy, else one more BUSY_IN_FLIGHT per call up to
        EVOMSGD_MAX_IN_FLIGHT (caller holds the lock)."""
        if self._busy():
            self._unpaced_room = BUSY_IN_FLIGHT
        else:
            self._unpaced_room = min(
                self._unpaced_room + BUSY_IN_FLIGHT, self.settings.max_in_flight
            )
        return self._unpaced_room

    def _probe_gap(self) -> float:
        """Seconds to the next probe of a healthy lane: EVOMSGD_PROBE_INTERVAL, +-10% so that
        lanes probed together drift apart instead of probing in step forever."""
        return self.settings.probe_interval * self._rng.uniform(0.9, 1.1)

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                wake_at = self.step()
            except StoreUnavailable as exc:
                log.warning("dispatcher: %s; trying again in 1s", exc)
                wake_at = self._time() + 1.0
            except Exception:
                log.exception("dispatcher step failed; trying again in 1s")
                wake_at = self._time() + 1.0
            with self._cond:
                if self._stopping:
                    return
                delay = wake_at - self._time()
                # Something changed during the step: look again at once instead of missing it.
                if delay > 0 and not self._changed:
                    self._cond.wait(min(delay, _MAX_WAIT))

    def step(self) -> float:
        """One pass: housekeeping if due, then the lanes an event touched or whose timer is due;
        returns when to wake next."""
        with self._cond:
            self._changed = False
        now = self._time()
        if now >= self._next_housekeeping:
            self._housekeeping(now)
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
        if self._draining:
            return min(now + _MAX_WAIT, self._next_housekeeping)
        with self._cond:
            while self._timers and self._timers[0][0] <= now:
                at, instance = heapq.heappop(self._timers)
                lane = self._lanes[instance]
                if lane.wake_at == at:
                    lane.wake_at = float("inf")
                    self._dirty.add(instance)
            todo = [self._lanes[instance] for instance in sorted(self._dirty)]
            self._dirty.clear()
        # One claim (one transaction, one fsync) and one hand-off for all the step's lanes: with
        # 1,000 paced instances a step hands out up to 1,000 messages, one per lane.
        plans = [self._plan(lane, now) for lane in todo]
        jobs = self._claim_all(plans, now)
        if jobs:
            self._hand(jobs)
        self._hold_all(plans, now)
        for plan in plans:
            lane_wake = self._next_look(plan, now)
            if lane_wake is not None and lane_wake != float("inf"):
                with self._cond:
                    self._schedule(plan.lane, max(lane_wake, now))
        with self._cond:
            wake_at = min(now + _MAX_WAIT, self._next_housekeeping)
            if self._timers:
                wake_at = min(wake_at, self._timers[0][0])
            return now if self._dirty else wake_at

    def _plan(self, lane: Lane, now: float) -> _Plan:
        """What the lane may hand out now (reserved in flight), or when to look again."""
        with self._cond:
            self._maybe_probe(lane, now)
            blocked = lane.blocked_until(now)
            if blocked is not None:
                return _Plan(lane, wake=blocked)
            gone = lane.gone(now)
            room = min(
                lane.concurrency - len(lane.in_flight),
                self.settings.max_in_flight - self._in_flight,
            )
            if lane.concurrency > BUSY_IN_FLIGHT:
                room = min(room, self._unpaced_bound() - len(lane.in_flight))
            if room <= 0:
                self._starved.add(lane.instance)
                return _Plan(lane)
            known = lane.known
            strangers_left = lane.new_contacts_left(now)
            quiet = lane.settings if lane.settings.quiet_hours else None
        if gone:
            return _Plan(lane, wake=self._fail_gone(lane, now))
        # Claimed messages are STARTED, so neither what is in flight nor its recipient's later
        # messages come back here.
        held: set[str] = set()
        if quiet is not None:
            plan = _Plan(lane, known=known)
            rows = self._quiet_rows(plan, now, room, strangers_left)
            held = {hold[0] for hold in plan.holds}
        elif strangers_left is None:
            rows = [
                (message_id, False) for message_id in self.store.ready(lane.instance, now, room)
            ]
            plan = _Plan(lane, known=known, short=len(rows) < room)
        else:
            rows = self.store.ready_contacts(lane.instance, now, room, strangers=strangers_left > 0)
            plan = _Plan(lane, known=known, short=len(rows) < room)
        with self._cond:
            for message_id, new_contact in rows:
                if message_id in held:
                    continue
                if (
                    lane.blocked_until(now) is not None
                    or self._in_flight >= self.settings.max_in_flight
                ):
                    break
                if new_contact:
                    left = lane.new_contacts_left(now)
                    if left is not None and left <= 0:
                        plan.short = True  # the rest waits for tomorrow's budget
                        continue
                    lane.count_new_contact(now)
                plan.taken.append(message_id)
                lane.in_flight.add(message_id)
                self._in_flight += 1
                lane.record_send(now, self._rng)
        return plan

    def _quiet_rows(
        self, plan: _Plan, now: float, room: int, strangers_left: int | None
    ) -> list[tuple[str, bool]]:
        """The due messages of a lane with quiet hours, as (id, new contact); those whose
        recipient is in quiet hours go to plan.holds instead (held until the window ends)."""
        lane = plan.lane
        limit = room + QUIET_SCAN
        found = self.store.ready_recipients(
            lane.instance, now, limit, strangers=strangers_left is None or strangers_left > 0
        )
        rows: list[tuple[str, bool]] = []
        for message_id, new_contact, phone, priority in found:
            hold = hold_for(phone, priority, lane.settings, now)
            if hold is None:
                rows.append((message_id, new_contact and strangers_left is not None))
            else:
                plan.holds.append((message_id, lane.instance, hold.until, hold.because()))
                with self._cond:
                    lane.quiet_held[message_id] = hold
        # All that is due was read: nothing more is due until next_due says. Otherwise, when
        # held messages left room, look again at once for more that may go.
        plan.short = len(found) < limit and len(rows) < room
        if len(found) == limit and plan.holds and len(rows) < room:
            plan.wake = now
        return rows

    def _hold_all(self, plans: list[_Plan], now: float) -> None:
        """Write the step's quiet-hours holds in one transaction (before next_due reads them)."""
        holds = [hold for plan in plans for hold in plan.holds]
        if not holds:
            return
        try:
            self._hold(holds, now)
        except StoreUnavailable as exc:
            log.warning(
                "dispatcher: cannot hold %s message(s) (%s); trying again in 1s", len(holds), exc
            )
            with self._cond:
                for plan in plans:
                    for hold in plan.holds:
                        plan.lane.quiet_held.pop(hold[0], None)
                    if plan.holds:
                        plan.wake = now + 1.0
                        plan.short = False

    def _claim_all(self, plans: list[_Plan], now: float) -> list[Job]:
        """Claim what the plans took, in one transaction; the jobs to hand out."""
        taken = [message_id for plan in plans for message_id in plan.taken]
        if not taken:
            return []
        try:
            claimed = self._claim(
                taken, now, self.settings.evolution_timeout + LEASE_MARGIN + MAX_DELAY
            )
        except StoreUnavailable as exc:
            log.warning(
                "dispatcher: cannot claim %s message(s) (%s); trying again in 1s", len(taken), exc
            )
            with self._cond:
                for plan in plans:
                    for message_id in plan.taken:
                        self._release(plan.lane, message_id)
                    if plan.taken:
                        plan.wake = now + 1.0
                    plan.taken = []
            return []
        rows = iter(claimed)
        jobs: list[Job] = []
        for plan in plans:
            for message_id in plan.taken:
                msg = next(rows)
                if msg is None or msg.status is not Status.STARTED:
                    # Canceled or expired meanwhile, or failed from what the ledger remembers
                    # (a number not on WhatsApp): nothing to send.
                    with self._cond:
                        self._release(plan.lane, message_id)
                        if msg is not None:
                            plan.lane.waiting = max(0, plan.lane.waiting - 1)
                    if msg is not None:
                        log.error(
                            "task %s instance %s: failed (%s): %s",
                            message_id,
                            plan.lane.instance,
                            msg.error_kind,
                            msg.last_error,
                            extra=log_fields(message_id, plan.lane.instance),
                        )
                    continue
                jobs.append(Job(message_id, plan.lane.instance, plan.known, msg, now))
        return jobs

    def _next_look(self, plan: _Plan, now: float) -> float | None:
        """When the lane needs a look again (None: only on an event), its next probe included."""
        lane = plan.lane
        wake = plan.wake
        if wake is None and plan.short:
            # Nothing more is due now: wake when the next waiting message becomes due - of
            # those to known contacts, and at midnight, once the new-contact budget is used up.
            with self._cond:
                no_strangers = lane.new_contacts_left(now) == 0
            wake = self.store.next_due(lane.instance, now, strangers=not no_strangers)
            if no_strangers:
                midnight = day_start(now) + DAY
                wake = midnight if wake is None else min(wake, midnight)
            with self._cond:
                if wake is None and not lane.in_flight:
                    lane.waiting = 0
        with self._cond:
            if wake is None and not plan.short:
                wake = lane.blocked_until(now)
            wants_probe = lane.health == Health.UNKNOWN or lane.waiting or lane.blocking
            if self._probe is not None and wants_probe and not lane.probing:
                return lane.next_probe_at if wake is None else min(wake, lane.next_probe_at)
        return wake

    def _hand(self, jobs: list[Job]) -> None:
        """Give claimed jobs to the workers; if that fails, the lease sweeper brings them back."""
        try:
            self._submit(jobs)
        except Exception:
            log.exception(
                "could not hand %s message(s) to a worker; they are sent again once their "
                "leases run out",
                len(jobs),
            )
            with self._cond:
                for job in jobs:
                    self._release(self._lane(job.instance), job.message_id)

    def _fail_gone(self, lane: Lane, now: float) -> float:
        """A missing instance's grace is over: its waiting messages fail now, without a send."""
        reason = (
            f"instance {lane.instance} does not exist in Evolution (for over "
            f"{lane.unknown_grace:g}s, EVOMSGD_UNKNOWN_INSTANCE_GRACE): {lane.last_error}"
        )
        failed = self.store.fail_waiting(lane.instance, now, reason, "unknown_instance")
        for message_id in failed:
            log.error(
                "task %s instance %s: failed (unknown_instance): %s",
                message_id,
                lane.instance,
                reason,
                extra=log_fields(message_id, lane.instance),
            )
        with self._cond:
            lane.waiting = max(0, lane.waiting - len(failed))
            if not lane.in_flight:
                lane.waiting = 0
            return lane.next_probe_at

    def _maybe_probe(self, lane: Lane, now: float) -> None:
        """Probe instances with waiting messages every probe_interval, or sooner while paused."""
        if self._probe is None or lane.probing or now < lane.next_probe_at:
            return
        if not lane.blocking:
            lane.next_probe_at = now + self._probe_gap()
            if lane.health != Health.UNKNOWN and not lane.waiting:
                return
        lane.probing = True
        future = self._probe(lane.instance)
        future.add_done_callback(functools.partial(self._probed, lane))

    def _probed(self, lane: Lane, fut: concurrent.futures.Future[StateProbe]) -> None:
        now = self._time()
        try:
            probe = fut.result()
        except Exception as exc:  # the probe itself broke: keep the state, try later
            log.warning(
                "instance %s: probe failed: %s",
                lane.instance,
                exc,
                extra=log_fields(instance=lane.instance),
            )
            probe = None
        with self._cond:
            lane.probing = False
            paused = lane.blocking
            effect = probe_effect(probe, lane.known) if probe is not None else None
            if effect is not None:
                self._apply(lane, effect, now)
            if lane.blocking:
                if paused:
                    lane.probe_backoff = min(lane.probe_backoff * 2, self.settings.probe_interval)
                lane.next_probe_at = now + lane.probe_backoff
            else:
                lane.next_probe_at = now + self._probe_gap()
            self._dirty.add(lane.instance)
            self._notify()

    def _housekeeping(self, now: float) -> None:
        for message_id, instance in self.store.recover(now, only_expired_leases=True):
            log.warning(
                "task %s instance %s: lease expired while sending; re-queued",
                message_id,
                instance,
                extra=log_fields(message_id, instance),
            )
            with self._cond:
                lane = self._lane(instance)
                self._release(lane, message_id)
                self._dirty.add(lane.instance)
        for message_id, instance in self.store.expire_due(now):
            log.info(
                "task %s instance %s: expired",
                message_id,
                instance,
                extra=log_fields(message_id, instance),
            )
            with self._cond:
                lane = self._lane(instance)
                lane.waiting = max(0, lane.waiting - 1)
                lane.quiet_held.pop(message_id, None)

    # -- views ----------------------------------------------------------------------------

    def backlog(self, instance: str) -> tuple[int, float]:
        """(messages waiting on an instance, mean seconds per send on it) for backpressure."""
        with self._cond:
            lane = self._lane(instance)
            return lane.waiting, lane.interval + (
                lane.settings.send_jitter or 0.0
            ) / 2 if lane.interval else 0.0

    def waiting_because(self, instance: str) -> str | None:
        """Why an instance is not sending right now, in words; None when it may send."""
        now = self._time()
        with self._cond:
            lane = self._lanes.get(instance)
            if lane is None:
                return None
            if lane.operator_paused:
                return f"instance {instance} is paused by an operator: {lane.operator_reason}"
            if lane.gone(now):
                return None  # its messages fail now; nothing to wait for
            if lane.blocking:
                return f"instance {instance} is paused ({lane.health.value}): {lane.last_error}"
            if lane.held_until > now:
                return f"instance {instance} rests until {clock.to_rfc3339(lane.held_until)}: {lane.last_error}"
            tomorrow = clock.to_rfc3339(day_start(now) + DAY)
            cap = lane.daily_cap(now)
            if cap is not None and lane.sent_today(now) >= cap:
                return (
                    f"instance {instance} has sent today's {cap} messages (warm-up day "
                    f"{lane.warmup_day(now)} of {lane.settings.warmup_days}) - it sends again "
                    f"at {tomorrow}"
                )
            if lane.new_contacts_left(now) == 0:
                return (
                    f"instance {instance} has written to today's {lane.settings.new_contacts_per_day}"
                    f" new contacts (new_contacts_per_day) - messages to new contacts wait until "
                    f"{tomorrow}"
                )
            return None

    def quiet_hold(
        self, instance: str, phone: str, priority: int, at: float | None = None
    ) -> Hold | None:
        """Whether the instance's quiet hours hold a message to `phone` at `at` (default: now),
        and until when."""
        at = self._time() if at is None else at
        with self._cond:
            lane = self._lanes.get(instance)
            settings = lane.settings if lane is not None else self.settings.lane(instance)
        return hold_for(phone, priority, settings, at)

    def warmup_free_at(self, instance: str) -> float | None:
        """When the warm-up's daily caps let a message accepted now go, behind those waiting
        on the instance; None when today's cap has room (or no warm-up). No SQL, a lock."""
        now = self._time()
        with self._cond:
            lane = self._lanes.get(instance)
            return None if lane is None else lane.warmup_free_at(now, lane.waiting)

    def new_contacts_reset(self, instance: str) -> float | None:
        """When the instance's new-contact budget, used up today, allows more (the next UTC
        midnight); None while it has room or no budget. For backpressure: no SQL, a lock."""
        now = self._time()
        with self._cond:
            lane = self._lanes.get(instance)
            if lane is None or lane.new_contacts_left(now) != 0:
                return None
            return day_start(now) + DAY

    @staticmethod
    def _budgets(lane: Lane, now: float) -> dict[str, int | None]:
        """Today's sends against the daily cap, new contacts against their budget, the
        warm-up day (caller holds the lock); None for what the lane does not limit."""
        cap = lane.daily_cap(now)
        if cap is None:
            cap = lane.settings.per_day
        budget = lane.settings.new_contacts_per_day or None
        return {
            "sent_today": lane.sent_today(now) if cap is not None else None,
            "daily_cap": cap,
            "warmup_day": lane.warmup_day(now),
            "warmup_days": lane.settings.warmup_days or None,
            "new_contacts_today": lane.new_contacts_today(now) if budget else None,
            "new_contacts_per_day": budget,
        }

    @staticmethod
    def _quiet_view(lane: Lane, now: float) -> dict[str, Any]:
        """The lane's quiet hours and, per zone, when they end for the messages they hold
        (caller holds the lock)."""
        if not lane.settings.quiet_hours:
            return {"quiet_hours": None, "quiet_held": None, "quiet_ends": []}
        ends = sorted(lane.quiet_ends(now).items(), key=lambda item: (item[1][0], item[0]))
        return {
            "quiet_hours": lane.settings.quiet_hours,
            "quiet_held": sum(count for _, (_, count) in ends),
            "quiet_ends": [
                QuietEnd(zone=zone, until=clock.to_rfc3339(until), held=count)
                for zone, (until, count) in ends
            ],
        }

    def lanes_view(self) -> list[LaneView]:
        """Each lane for /instances, /health and `evomsgd status`."""
        now = self._time()

        def at(ts: float | None) -> str | None:
            return clock.to_rfc3339(ts) if ts else None

        with self._cond:
            lanes = sorted(self._lanes.values(), key=lambda lane: lane.instance)
            return [
                LaneView(
                    instance=lane.instance,
                    state=lane.state(now),
                    health=lane.health.value,
                    waiting=lane.waiting,
                    in_flight=len(lane.in_flight),
                    next_send_at=at(lane.next_send_at) if lane.next_send_at > now else None,
                    held_until=at(lane.held_until) if lane.held_until > now else None,
                    paused_reason=lane.operator_reason if lane.operator_paused else None,
                    problem=lane.problem(now),
                    last_error=lane.last_error,
                    last_error_at=at(lane.last_error_at),
                    recovered_at=at(lane.recovered_at),
                    send_interval=lane.settings.send_interval or 0.0,
                    send_jitter=lane.settings.send_jitter or 0.0,
                    **self._budgets(lane, now),
                    **self._quiet_view(lane, now),
                )
                for lane in lanes
            ]
