"""Pacing lanes: one per Evolution instance, deciding when it may send next."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from evomsgd.config import LaneSettings
from evomsgd.engine.quiet import Hold

_WINDOWS = (("per_minute", 60.0), ("per_hour", 3600.0), ("per_day", 86_400.0))
DAY = 86_400.0


def day_start(ts: float) -> float:
    """The UTC midnight that begins the day of `ts`: the warm-up and the new-contact budget
    count UTC days."""
    return ts - ts % DAY


class Health(StrEnum):
    """What evomsgd believes about an instance."""

    UNKNOWN = "unknown"  # not probed yet: sending allowed
    OPEN = "open"  # connected to WhatsApp
    CLOSE = "close"  # not paired or disconnected: paused until a probe says open
    DOWN = "down"  # Evolution unreachable: paused until a probe answers
    CONFIG_ERROR = "config_error"  # bad key, wrong URL, licence: paused until a probe succeeds
    # Evolution says the instance does not exist although it sent before (deleted, perhaps to be
    # re-created): paused for a grace period, then its messages fail until it exists again.
    UNKNOWN_INSTANCE = "unknown_instance"


# The states in which a lane sends nothing and probes until a probe says otherwise.
BLOCKING = frozenset({Health.CLOSE, Health.DOWN, Health.CONFIG_ERROR, Health.UNKNOWN_INSTANCE})


@dataclass
class Lane:
    """One instance's state; mutated only under the dispatcher's lock."""

    instance: str
    settings: LaneSettings
    concurrency: int = 1
    unknown_grace: float = 900.0  # seconds a known instance may be missing before messages fail
    in_flight: set[str] = field(default_factory=set)
    next_send_at: float = 0.0
    held_until: float = 0.0  # rate-limit rest
    operator_paused: bool = False
    operator_reason: str | None = None
    health: Health = Health.UNKNOWN
    known: bool = False  # has sent at least once (recorded in the ledger)
    missing_since: float | None = None  # when Evolution first said it has no such instance
    last_error: str | None = None
    last_error_at: float | None = None
    recovered_at: float | None = None  # when it sent (or probed open) again after last_error
    next_probe_at: float = 0.0
    probe_backoff: float = 1.0
    probing: bool = False
    waiting: int = 0
    wake_at: float = float("inf")  # the dispatcher's timer for this lane (inf: none set)
    sends: deque[float] = field(default_factory=deque)  # attempt start times, newest last
    first_sent_at: float | None = None  # its first successful send (the ledger's lanes row)
    new_contacts: int = 0  # messages to new contacts handed out on the UTC day new_contacts_day
    new_contacts_day: float = 0.0
    # Messages held by quiet hours where their recipients live (id -> until when), for the views.
    quiet_held: dict[str, Hold] = field(default_factory=dict)

    @property
    def interval(self) -> float:
        return self.settings.send_interval or 0.0

    @property
    def blocking(self) -> bool:
        """The lane's health stops it sending (it probes until that changes)."""
        return self.health in BLOCKING

    def gone(self, now: float) -> bool:
        """A missing instance's grace period is over: its messages fail instead of waiting."""
        return (
            self.health == Health.UNKNOWN_INSTANCE
            and self.missing_since is not None
            and now >= self.missing_since + self.unknown_grace
        )

    def state(self, now: float) -> str:
        """One word for operators: sending, idle, paused, held, or the blocking health."""
        if self.operator_paused:
            return "paused"
        if self.blocking:
            return self.health.value
        if self.held_until > now:
            return "held"
        return "sending" if self.in_flight or self.waiting else "idle"

    def problem(self, now: float) -> str | None:
        """What stops the lane now, in words; None while nothing does (the last error is history)."""
        if self.operator_paused:
            return self.operator_reason or "paused by an operator"
        if self.blocking or self.held_until > now:
            return self.last_error
        return None

    def blocked_until(self, now: float) -> float | None:
        """None when the lane may send now; otherwise when to look again (inf: wait for an event)."""
        if self.operator_paused:
            return float("inf")
        if self.blocking and not self.gone(now):
            if self.health == Health.UNKNOWN_INSTANCE and self.missing_since is not None:
                return min(self.next_probe_at, self.missing_since + self.unknown_grace)
            return self.next_probe_at
        if self.held_until > now:
            return self.held_until
        if len(self.in_flight) >= self.concurrency:
            return float("inf")
        if self.next_send_at > now:
            return self.next_send_at
        return self.cap_free_at(now)

    def warmup_day(self, now: float) -> int | None:
        """The day of the warm-up ramp (1: the UTC day of the first send, or today before any
        send); None when the instance is not warming up (off, or past warmup_days)."""
        days = self.settings.warmup_days
        if not days:
            return None
        first = now if self.first_sent_at is None else min(self.first_sent_at, now)
        day = int((day_start(now) - day_start(first)) // DAY) + 1
        return day if day <= days else None

    def daily_cap(self, now: float) -> int | None:
        """Today's cap on sends from the warm-up (warmup_start doubled each day, never above
        per_day); None outside the warm-up, where only per_day (a rolling 24 hours) applies."""
        day = self.warmup_day(now)
        return None if day is None else self._ramp(day)

    def _ramp(self, day: int) -> int:
        """The warm-up's cap on its day `day` (1, 2, ...)."""
        cap: int = (self.settings.warmup_start or 1) * 2 ** (day - 1)
        return cap if self.settings.per_day is None else min(cap, self.settings.per_day)

    def warmup_free_at(self, now: float, ahead: int) -> float | None:
        """When the warm-up's daily caps let a message with `ahead` messages before it go (the
        UTC midnight of that day); None when today's cap has room for it, or no warm-up."""
        day = self.warmup_day(now)
        if day is None:
            return None
        left = ahead - (self._ramp(day) - self.sent_today(now))
        midnight = day_start(now) + DAY
        while left >= 0 and day < (self.settings.warmup_days or 0):
            day += 1
            left -= self._ramp(day)
            if left < 0:
                return midnight
            midnight += DAY
        return None if left < 0 else midnight

    def sent_today(self, now: float) -> int:
        """Attempts started since UTC midnight (complete only while a daily cap loads them)."""
        midnight = day_start(now)
        return sum(1 for t in self.sends if t >= midnight)

    def new_contacts_today(self, now: float) -> int:
        """Messages to new contacts handed out since UTC midnight."""
        return self.new_contacts if self.new_contacts_day == day_start(now) else 0

    def new_contacts_left(self, now: float) -> int | None:
        """How many more new contacts it may write to today; None when it has no budget."""
        budget = self.settings.new_contacts_per_day
        if not budget:
            return None
        return max(0, budget - self.new_contacts_today(now))

    def count_new_contact(self, now: float) -> None:
        """A message to a new contact is handed out now."""
        self.new_contacts = self.new_contacts_today(now) + 1
        self.new_contacts_day = day_start(now)

    def cap_free_at(self, now: float) -> float | None:
        """When the per-minute/hour/day caps and the warm-up allow one more send (None: now)."""
        horizon = now - 86_400.0
        while self.sends and self.sends[0] <= horizon:
            self.sends.popleft()
        latest: float | None = None
        today = self.daily_cap(now)
        if today is not None and self.sent_today(now) >= today:
            latest = day_start(now) + DAY
        for name, window in _WINDOWS:
            cap: int | None = getattr(self.settings, name)
            if cap is None:
                continue
            recent = [t for t in self.sends if t > now - window]
            if len(recent) >= cap:
                free_at = recent[-cap] + window
                latest = free_at if latest is None else max(latest, free_at)
        return latest

    def record_send(self, now: float, rng: random.Random) -> None:
        """A send starts now: the next may start after the gap plus jitter."""
        self.sends.append(now)
        jitter = self.settings.send_jitter or 0.0
        gap = self.interval + (rng.uniform(0.0, jitter) if jitter and self.interval else 0.0)
        self.next_send_at = now + gap

    def quiet_ends(self, now: float) -> dict[str, tuple[float, int]]:
        """Zone -> (when its quiet hours end, messages they hold) for the lane's held messages
        whose window is not over yet (the rest are forgotten)."""
        ends: dict[str, tuple[float, int]] = {}
        for message_id, hold in list(self.quiet_held.items()):
            if hold.until <= now:
                del self.quiet_held[message_id]
                continue
            until, count = ends.get(hold.zone, (hold.until, 0))
            ends[hold.zone] = (min(until, hold.until), count + 1)
        return ends
