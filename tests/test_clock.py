"""Ledger timestamps: the text form sqlite3 compares, exact to the millisecond."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from evomsgd import clock


def _reference(ts: float) -> str:
    """The plain, uncached formatting."""
    whole, ms = int(ts), round((ts - int(ts)) * 1000)
    if ms == 1000:
        whole, ms = whole + 1, 0
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%d %H:%M:%S") + f".{ms:03d}"


def test_ledger_times_at_the_edges() -> None:
    assert clock.to_db(0) == "1970-01-01 00:00:00.000"
    assert clock.to_db(1.9996) == "1970-01-01 00:00:02.000"  # rounds into the next second
    assert clock.to_db(clock.MAX_TS) == "9999-12-31 23:59:59.000"
    assert clock.to_db(1_795_000_000.123) == "2026-11-18 11:06:40.123"


@given(st.floats(min_value=0, max_value=clock.MAX_TS - 1, allow_nan=False))
def test_ledger_times_match_plain_formatting_and_round_trip(ts: float) -> None:
    text = clock.to_db(ts)
    assert text == _reference(ts)  # the per-second cache changes nothing
    assert abs(clock.from_db(text) - ts) <= 0.0005 + 1e-6 * max(1.0, ts / 1e9)
