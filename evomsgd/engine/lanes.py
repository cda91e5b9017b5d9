"""Pacing lanes: one per Evolution instance, deciding when it may send next."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from evomsgd.config import LaneSettings

_WINDOWS = (("per_minute", 60.0), ("per_hour", 3600.0), ("per_day", 86_400.0))


class Health(StrEnum):
    """What evomsgd believes about an instance."""

    UNKNOWN = "unknown"  # not probed yet: sending allowed
    OPEN = "open"  # connected to WhatsApp
    CLOSE = "close"  # not paired or disconnected: paused until a probe says open
    DOWN = "down"  # Evolution unreachable: paused until a probe answers
    CONFIG_ERROR = "config_error"  # bad key, wrong URL, licence: paused until a probe succeeds


_BLOCKING = {Health.CLOSE, Health.DOWN, Health.CONFIG_ERROR}


@dataclass
class Lane:
    """One instance's state; mutated only under the dispatcher's lock."""

    instance: str
    settings: LaneSettings
    concurrency: int = 1
    in_flight: set[str] = field(default_factory=set)
    next_send_at: float = 0.0
    held_until: float = 0.0  # rate-limit rest
    operator_paused: bool = False
    operator_reason: str | None = None
    health: Health = Health.UNKNOWN
    last_error: str | None = None
    last_error_at: float | None = None
    next_probe_at: float = 0.0
    probe_backoff: float = 1.0
    probing: bool = False
    waiting: int = 0
    idle: bool = False  # nothing due and nothing scheduled: skip until notified
    sends: deque[float] = field(default_factory=deque)  # attempt start times, newest last

    @property
    def interval(self) -> float:
        return self.settings.send_interval or 0.0

    def state(self, now: float) -> str:
        """One word for operators: sending, idle, paused, held, close, down, config_error."""
        if self.operator_paused:
            return "paused"
        if self.health in _BLOCKING:
            return self.health.value
        if self.held_until > now:
            return "held"
        return "sending" if self.in_flight or self.waiting else "idle"

    def blocked_until(self, now: float) -> float | None:
        """None when the lane may send now; otherwise when to look again (inf: wait for an event)."""
        if self.operator_paused:
            return float("inf")
        if self.health in _BLOCKING:
            return self.next_probe_at
        if self.held_until > now:
            return self.held_until
        if len(self.in_flight) >= self.concurrency:
            return float("inf")
        if self.next_send_at > now:
            return self.next_send_at
        return self.cap_free_at(now)

    def cap_free_at(self, now: float) -> float | None:
        """When the per-minute/hour/day caps allow one more send (None: now)."""
        horizon = now - 86_400.0
        while self.sends and self.sends[0] <= horizon:
            self.sends.popleft()
        latest: float | None = None
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
