"""Quiet hours' pure rule (engine/quiet.py): zones, windows across midnight, DST nights."""

from __future__ import annotations

import datetime as dt

import pytest

from evomsgd.config import LaneSettings, load_settings
from evomsgd.engine.quiet import Hold, hold_for, hold_until, window
from evomsgd.errors import ConfigError
from evomsgd.phone import time_zones

NIGHT = window("21:00-08:00")
MEXICO = "525512345678"  # Mexico City (UTC-6 all year since 2022)
SAO_PAULO = "5511988887777"  # UTC-3
MADRID = "34612345678"  # a Spanish mobile: Madrid (UTC+1/+2) or the Canaries (UTC+0/+1)


def utc(*parts: int) -> float:
    return dt.datetime(*parts, tzinfo=dt.UTC).timestamp()


def quiet(**lane: object) -> LaneSettings:
    return LaneSettings(quiet_hours="21:00-08:00", **lane)  # type: ignore[arg-type]


def test_a_recipient_in_quiet_hours_waits_until_08_00_where_they_live() -> None:
    at = utc(2026, 12, 2, 3, 0)  # 21:00 in Mexico City
    assert hold_for(MEXICO, 0, quiet(), at) == Hold(utc(2026, 12, 2, 14, 0), "America/Mexico_City")
    assert hold_for(MEXICO, 0, quiet(), at - 1) is None  # 20:59:59: not yet
    assert hold_for(MEXICO, 0, quiet(), utc(2026, 12, 2, 14, 0)) is None  # 08:00: over
    assert hold_for(MEXICO, 0, quiet(), at).because() == (  # type: ignore[union-attr]
        "quiet hours in America/Mexico_City until 08:00"
    )


def test_the_same_instant_is_night_in_one_zone_and_evening_in_another() -> None:
    at = utc(2026, 12, 2, 1, 0)  # 22:00 in Sao Paulo, 19:00 in Mexico City
    assert hold_for(SAO_PAULO, 0, quiet(), at) == Hold(
        utc(2026, 12, 2, 11, 0), "America/Sao_Paulo"
    )
    assert hold_for(MEXICO, 0, quiet(), at) is None


def test_high_priority_and_lanes_without_quiet_hours_never_wait() -> None:
    at = utc(2026, 12, 2, 3, 0)
    assert hold_for(MEXICO, 1, quiet(), at) is None
    assert hold_for(MEXICO, 0, LaneSettings(), at) is None
    assert hold_for(MEXICO, 0, LaneSettings(quiet_hours=""), at) is None


def test_the_instance_timezone_wins_over_the_numbers() -> None:
    at = utc(2026, 12, 2, 1, 0)  # 19:00 in Mexico City, 22:00 in Sao Paulo
    held = hold_for(MEXICO, 0, quiet(timezone="America/Sao_Paulo"), at)
    assert held == Hold(utc(2026, 12, 2, 11, 0), "America/Sao_Paulo")


def test_a_number_that_cannot_be_placed_is_not_held() -> None:
    assert time_zones("120363025246125486@g.us") == ()
    assert time_zones("15555551234") == ()  # 555: no real area
    assert hold_for("15555551234", 0, quiet(), utc(2026, 12, 2, 3, 0)) is None
    assert time_zones("5511988887777@s.whatsapp.net") == ("America/Sao_Paulo",)


def test_a_country_with_two_zones_waits_until_it_is_day_in_both() -> None:
    assert time_zones(MADRID) == ("Atlantic/Canary", "Europe/Madrid")
    # 07:30 UTC in December: 08:30 in Madrid (day) but 07:30 in the Canaries (night).
    assert hold_for(MADRID, 0, quiet(), utc(2026, 12, 2, 7, 30)) == Hold(
        utc(2026, 12, 2, 8, 0), "Atlantic/Canary"
    )
    # 20:30 UTC: 21:30 in Madrid. Its night ends at 07:00 UTC, when the Canaries' still lasts.
    held = hold_for(MADRID, 0, quiet(), utc(2026, 12, 2, 20, 30))
    assert held == Hold(utc(2026, 12, 3, 8, 0), "Atlantic/Canary")
    assert held.because() == "quiet hours in Atlantic/Canary until 08:00"
    # 20:30 UTC is 20:30 in the Canaries, 21:30 in Madrid: quiet in one is enough to wait.
    assert hold_for(MADRID, 0, quiet(), utc(2026, 12, 2, 19, 59)) is None


def test_zones_whose_nights_cover_the_whole_day_wait_for_the_first_to_end() -> None:
    # 18:00-10:00 is 16 hours; Russia's zones span 10 (UTC+2 to +12): no hour is day in all.
    zones = time_zones("79161234567")
    at = utc(2026, 12, 2, 12, 0)  # 15:00 in Moscow (day), 24:00 in Anadyr and Kamchatka (night)
    # The first night to end: 10:00 in UTC+12, 22:00 UTC (the zones compared by name on a tie).
    assert hold_until(zones, window("18:00-10:00"), at) == Hold(
        utc(2026, 12, 2, 22, 0), "Asia/Anadyr"
    )


def test_a_window_within_one_day() -> None:
    lunch = LaneSettings(quiet_hours="12:00-14:00", timezone="UTC")
    assert hold_for(MEXICO, 0, lunch, utc(2026, 12, 2, 11, 59)) is None
    assert hold_for(MEXICO, 0, lunch, utc(2026, 12, 2, 12, 0)) == Hold(utc(2026, 12, 2, 14), "UTC")
    assert hold_for(MEXICO, 0, lunch, utc(2026, 12, 2, 14, 0)) is None


def test_the_window_crossing_midnight_ends_the_next_morning_and_after_midnight_the_same() -> None:
    ny = quiet(timezone="America/New_York")  # EST (UTC-5) in December
    before = hold_for(MEXICO, 0, ny, utc(2026, 12, 3, 4, 0))  # 23:00 on the 2nd
    after = hold_for(MEXICO, 0, ny, utc(2026, 12, 3, 6, 0))  # 01:00 on the 3rd
    assert before == after == Hold(utc(2026, 12, 3, 13, 0), "America/New_York")


def test_the_spring_forward_night_is_an_hour_shorter() -> None:
    ny = quiet(timezone="America/New_York")
    # 2026-03-08 02:00 EST the clocks jump to 03:00 EDT. 21:00 EST on the 7th = 02:00 UTC.
    start = utc(2026, 3, 8, 2, 0)
    held = hold_for(MEXICO, 0, ny, start)
    assert held == Hold(utc(2026, 3, 8, 12, 0), "America/New_York")  # 08:00 EDT
    assert held.until - start == 10 * 3600
    assert hold_for(MEXICO, 0, ny, start - 1) is None


def test_the_fall_back_night_is_an_hour_longer() -> None:
    ny = quiet(timezone="America/New_York")
    # 2026-11-01 02:00 EDT the clocks go back to 01:00 EST. 21:00 EDT on Oct 31 = 01:00 UTC.
    start = utc(2026, 11, 1, 1, 0)
    held = hold_for(MEXICO, 0, ny, start)
    assert held == Hold(utc(2026, 11, 1, 13, 0), "America/New_York")  # 08:00 EST
    assert held.until - start == 12 * 3600


def test_a_window_ending_in_the_skipped_hour_ends_when_the_clocks_jump() -> None:
    late = LaneSettings(quiet_hours="22:00-02:30", timezone="America/New_York")
    # 01:00 EST on 2026-03-08; 02:30 never happens that night: 01:59:59 EST -> 03:00 EDT.
    held = hold_for(MEXICO, 0, late, utc(2026, 3, 8, 6, 0))
    assert held == Hold(utc(2026, 3, 8, 7, 0), "America/New_York")
    assert held.because() == "quiet hours in America/New_York until 03:00"


def test_a_window_ending_in_the_repeated_hour_is_quiet_again_when_it_repeats() -> None:
    late = LaneSettings(quiet_hours="22:00-01:30", timezone="America/New_York")
    # 01:00 EDT on 2026-11-01 ends at the first 01:30 (05:30 UTC)...
    assert hold_for(MEXICO, 0, late, utc(2026, 11, 1, 5, 0)) == Hold(
        utc(2026, 11, 1, 5, 30), "America/New_York"
    )
    assert hold_for(MEXICO, 0, late, utc(2026, 11, 1, 5, 45)) is None  # 01:45 EDT
    # ...and the clocks read 01:10 again an hour later (EST): quiet until the second 01:30.
    assert hold_for(MEXICO, 0, late, utc(2026, 11, 1, 6, 10)) == Hold(
        utc(2026, 11, 1, 6, 30), "America/New_York"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVOMSGD_QUIET_HOURS": "9pm-8am"},
            "invalid configuration - EVOMSGD_QUIET_HOURS: Value error, quiet hours must be "
            "HH:MM-HH:MM, like 21:00-08:00 (got '9pm-8am')",
        ),
        (
            {"EVOMSGD_QUIET_HOURS": "08:00-08:00"},
            "invalid configuration - EVOMSGD_QUIET_HOURS: Value error, quiet hours start and end "
            "at the same time - give a window (got '08:00-08:00')",
        ),
        (
            {"EVOMSGD_TIMEZONE": "Mexico City"},
            "invalid configuration - EVOMSGD_TIMEZONE: Value error, not an IANA time zone - use "
            "a name like America/Mexico_City (got 'Mexico City')",
        ),
    ],
)
def test_bad_quiet_hours_and_zones_are_refused_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert str(caught.value) == message


def test_a_section_overrides_the_default_and_an_empty_one_turns_it_off() -> None:
    settings = load_settings(
        flags={"instances": {"day": {"quiet_hours": ""}, "shop": {"quiet_hours": "22:00-07:00"}}},
        env={"EVOMSGD_QUIET_HOURS": "21:00-08:00", "EVOMSGD_TIMEZONE": "America/Bogota"},
    )
    assert settings.lane("other").quiet_hours == "21:00-08:00"
    assert settings.lane("shop").quiet_hours == "22:00-07:00"
    assert settings.lane("day").quiet_hours == ""
    assert settings.lane("shop").timezone == "America/Bogota"
