"""Time in the ledger: UTC text 'YYYY-MM-DD HH:MM:SS.fff' that sorts and compares in sqlite3."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

# The same shape as sqlite's strftime('%Y-%m-%d %H:%M:%f', 'now'), so an operator can write
# `WHERE created_at > datetime('now', '-1 hour')` and get the right rows.
_DB_FORMAT = "%Y-%m-%d %H:%M:%S"


def now() -> float:
    """Wall-clock seconds since the epoch (the one place the daemon reads the time of day)."""
    return time.time()


# The ledger's text timestamps cover 1970 to 9999; API input outside that is refused with 422.
MAX_TS = 253_402_300_799.0


def storable(ts: float) -> bool:
    """True when `ts` can be written to the ledger."""
    return 0 <= ts <= MAX_TS


def to_db(ts: float) -> str:
    """Format epoch seconds for the ledger."""
    whole = int(ts)
    ms = round((ts - whole) * 1000)
    if ms == 1000:
        whole, ms = whole + 1, 0
    return f"{_db_second(whole)}.{ms:03d}"


# A batch of messages shares its few distinct seconds (created, next attempt, expiry): the cache
# turns most of the 2 us strftime into a lookup, on the group-commit thread's share of the GIL.
@functools.lru_cache(maxsize=256)
def _db_second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime(_DB_FORMAT)


def from_db(text: str) -> float:
    """Parse a ledger timestamp back to epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def db_to_rfc3339(text: str | None) -> str | None:
    """Ledger timestamp to RFC 3339 for API responses."""
    if text is None:
        return None
    return text.replace(" ", "T") + "Z"


def to_rfc3339(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds, the API's time format."""
    return db_to_rfc3339(to_db(ts)) or ""


def from_datetime(value: datetime) -> float:
    """An aware datetime to epoch seconds (naive ones are rejected by the models)."""
    return value.timestamp()
