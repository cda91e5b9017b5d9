"""Quiet hours: whether a message may go now where its recipient lives, and if not, until when.

Pure: a clock reading in, a `Hold` (or None) out. The dispatcher holds a normal-priority message
whose recipient is inside the window until the window ends there; high priority (one-time codes)
never waits. The recipient's zones come from the number (libphonenumber's prefix data) unless the
instance names one. A number that may live in several zones (a country spanning them) may be
written to only when it is outside quiet hours in every one of them.
"""

from __future__ import annotations

import datetime as dt
import functools
import zoneinfo
from dataclasses import dataclass

from evomsgd.config import LaneSettings, quiet_window
from evomsgd.phone import time_zones

# Beyond this the zones' windows together leave no gap (e.g. 21:00-08:00 across 14 hours of
# zones): the message waits only for the first zone's window to end instead of forever.
_HORIZON = 2 * 86_400.0


@dataclass(frozen=True, slots=True)
class Window:
    """Local start and end of the quiet hours; one that crosses midnight when start > end."""

    start: dt.time
    end: dt.time

    def covers(self, local: dt.time) -> bool:
        """`local` wall time is inside the window (its start included, its end not)."""
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@functools.lru_cache(maxsize=64)
def window(text: str) -> Window:
    """The window of a quiet_hours value (config checked it)."""
    return Window(*quiet_window(text))


@dataclass(frozen=True, slots=True)
class Hold:
    """A message waits until `until` (UTC seconds): quiet hours end then in `zone`."""

    until: float
    zone: str

    def because(self) -> str:
        """Words for waiting_because: "quiet hours in America/Mexico_City until 08:00"."""
        local = dt.datetime.fromtimestamp(self.until, zoneinfo.ZoneInfo(self.zone))
        return f"quiet hours in {self.zone} until {local:%H:%M}"


def _instants(zone: zoneinfo.ZoneInfo, wall: dt.datetime) -> list[float]:
    """The UTC instants at which `wall` (naive) is the local time in `zone`, earliest first: one,
    two on a fall-back night (the hour repeats), or, when the clocks skip it (spring forward),
    the instant of the jump - the first at which the local time is past it."""
    first = wall.replace(tzinfo=zone, fold=0).timestamp()
    second = wall.replace(tzinfo=zone, fold=1).timestamp()
    if first == second:
        return [first]
    if first < second:
        return [first, second]
    # In the gap fold=1 reads the wall time with the offset after the jump (too early) and fold=0
    # with the one before (too late); the jump lies between, on a whole second.
    lo, hi = int(second), int(first)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return [float(hi)]


def window_end(zone: zoneinfo.ZoneInfo, quiet: Window, now: float) -> float | None:
    """When the quiet hours that hold at `now` in `zone` end; None when `now` is not quiet."""
    local = dt.datetime.fromtimestamp(now, zone)
    if not quiet.covers(local.time()):
        return None
    day = local.date()
    if quiet.start > quiet.end and local.time() >= quiet.start:
        day += dt.timedelta(days=1)  # the window crosses midnight: it ends tomorrow
    for date in (day, day + dt.timedelta(days=1)):
        for instant in _instants(zone, dt.datetime.combine(date, quiet.end)):
            if instant > now:
                return instant
    raise AssertionError("a quiet window always ends within two days")  # pragma: no cover


# A dispatcher step asks at one `now` for up to a few hundred recipients, mostly of a few zone
# sets: each set is worked out once (Russia's 16 zones take dozens of window computations).
@functools.lru_cache(maxsize=4096)
def hold_until(zones: tuple[str, ...], quiet: Window, now: float) -> Hold | None:
    """The end of the quiet hours at `now` in all of `zones` (the first instant outside the
    window in every one), None when none of them is quiet now."""
    tzs = [(name, zoneinfo.ZoneInfo(name)) for name in zones]
    at, binding = now, None
    for _ in range(4 * len(tzs) + 4):
        ends = [(end, name) for name, tz in tzs if (end := window_end(tz, quiet, at)) is not None]
        if not ends:
            return None if binding is None else Hold(at, binding)
        at, binding = max(ends)
        if at > now + _HORIZON:
            break
    first = min((end, name) for name, tz in tzs if (end := window_end(tz, quiet, now)) is not None)
    return Hold(*first)


@functools.lru_cache(maxsize=65_536)
def _zones_of(phone: str) -> tuple[str, ...]:
    # libphonenumber parses in tens of microseconds; the same recipients come back all night.
    return time_zones(phone)


def hold_for(phone: str, priority: int, lane: LaneSettings, now: float) -> Hold | None:
    """Whether the lane's quiet hours hold a message to `phone` at `now` (None: it may go)."""
    if not lane.quiet_hours or priority > 0:
        return None
    zones = (lane.timezone,) if lane.timezone else _zones_of(phone)
    if not zones:
        return None  # nowhere known to be night: the number cannot be placed
    return hold_until(zones, window(lane.quiet_hours), now)
