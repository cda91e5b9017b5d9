"""Quiet hours' pure rule (engine/quiet.py): zones, windows across midnight, DST nights."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path
from typing import Any

import pytest

from evomsgd import clock
from evomsgd.cli.status import render
from evomsgd.config import LaneSettings, load_settings
from evomsgd.engine.dispatcher import Dispatcher
from evomsgd.engine.quiet import Hold, hold_for, hold_until, window
from evomsgd.errors import ConfigError, StoreUnavailable
from evomsgd.models import Status
from evomsgd.phone import time_zones
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import SENT, TRANSIENT, Stepper

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
    assert hold_for(SAO_PAULO, 0, quiet(), at) == Hold(utc(2026, 12, 2, 11, 0), "America/Sao_Paulo")
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


# -- the dispatcher: holds per recipient, timers, order -------------------------------------

NIGHT_IN_MEXICO = utc(2026, 12, 2, 13, 0)  # 07:00 in Mexico City, 10:00 in Sao Paulo
MORNING_IN_MEXICO = utc(2026, 12, 2, 14, 0)  # 08:00 there


def quiet_stepper(
    data_dir: Path, now: float = NIGHT_IN_MEXICO, probe_interval: float = 0.3, **lane: Any
) -> Stepper:
    return Stepper(
        data_dir,
        now=now,
        probe_interval=probe_interval,
        instances={"main": LaneSettings(quiet_hours="21:00-08:00", **lane)},
    )


def send_due(s: Stepper) -> list[str]:
    """Step and send what is handed out until nothing is left to do now (a dispatcher that
    kept asking to look again at once would be spinning); the phones, in order."""
    sent: list[str] = []
    for _ in range(100):
        wake = s.step()
        jobs = s.take()
        if not jobs and wake > s.now:
            return sent
        sent += [s.attempt(job, SENT).phone for job in jobs]
    raise AssertionError("the dispatcher keeps waking at once: it spins")


def counting(s: Stepper) -> list[int]:
    """How often the dispatcher reads a quiet lane's due messages (a spy on the real query)."""
    calls = [0]
    real = s.store.ready_recipients

    def spy(*args: Any, **kwargs: Any) -> list[tuple[str, bool, str, int]]:
        calls[0] += 1
        return real(*args, **kwargs)

    s.store.ready_recipients = spy  # type: ignore[method-assign]
    return calls


def test_a_recipient_at_night_waits_and_does_not_hold_back_one_in_daylight(tmp_path: Path) -> None:
    s = quiet_stepper(tmp_path)
    night = s.accept(MEXICO)
    s.accept(SAO_PAULO)
    assert send_due(s) == [SAO_PAULO]
    row = s.store.get(night)
    assert row is not None and row.status is Status.PENDING
    assert row.next_attempt_at == clock.to_db(MORNING_IN_MEXICO)
    assert [e.detail for e in s.store.history(night) if e.event == "held"] == [
        "quiet hours in America/Mexico_City until 08:00"
    ]
    assert s.dispatcher.quiet_hold("main", MEXICO, 0) == Hold(
        MORNING_IN_MEXICO, "America/Mexico_City"
    )
    (view,) = s.dispatcher.lanes_view()
    assert (view.quiet_hours, view.quiet_held) == ("21:00-08:00", 1)
    assert [(e.zone, e.until, e.held) for e in view.quiet_ends] == [
        ("America/Mexico_City", clock.to_rfc3339(MORNING_IN_MEXICO), 1)
    ]
    s.now = MORNING_IN_MEXICO
    assert send_due(s) == [MEXICO]
    (view,) = s.dispatcher.lanes_view()
    assert (view.quiet_held, view.quiet_ends) == (0, [])
    s.close()


def test_a_held_recipient_gets_a_timer_not_a_look_at_every_step(tmp_path: Path) -> None:
    # Without probes (a lane with waiting messages is probed, and looked at, every
    # probe_interval: 30 s by default), nothing but the timer brings the lane back.
    s = quiet_stepper(tmp_path, probe_interval=86_400.0)
    s.accept(MEXICO)
    assert send_due(s) == []
    s.now += 5.0  # a new lane's first probe comes within 5 s; its answer wakes the lane
    while s.step() <= s.now:  # until nothing is left to look at now
        pass
    assert s.probes == ["main"] and s.take() == []
    reads = counting(s)
    for minute in range(1, 60):  # the rest of the night: steps (housekeeping) but no look
        s.now = NIGHT_IN_MEXICO + 60 * minute
        s.step()
    assert reads == [0] and s.take() == []
    s.now = MORNING_IN_MEXICO  # the timer for the window's end
    s.step()
    assert reads == [1] and [job.message.phone for job in s.take() if job.message] == [MEXICO]
    s.close()


def test_high_priority_goes_at_night_and_normal_ones_keep_their_order(tmp_path: Path) -> None:
    s = quiet_stepper(tmp_path)
    first = s.accept(MEXICO)
    second = s.accept(MEXICO)
    code = s.accept(MEXICO, priority=1)  # a one-time code: quiet hours do not apply
    send_due(s)
    assert s.started == [code]
    s.now = MORNING_IN_MEXICO
    send_due(s)
    assert s.started == [code, first, second]
    s.close()


def test_a_retry_that_falls_into_the_night_waits_and_keeps_the_later_one_behind(
    tmp_path: Path,
) -> None:
    evening = utc(2026, 12, 3, 2, 59, 59)  # 20:59:59 in Mexico City
    s = quiet_stepper(tmp_path, now=evening)
    first = s.accept(MEXICO)
    later = s.accept(MEXICO)
    s.step()
    (job,) = s.take()
    assert s.attempt(job, TRANSIENT).status is Status.RETRY  # due again in 0.05 s: 21:00
    s.now = evening + 1
    assert send_due(s) == []
    row = s.store.get(first)
    morning = utc(2026, 12, 3, 14, 0)
    assert row is not None and row.status is Status.RETRY
    assert row.next_attempt_at == clock.to_db(morning)
    s.now = morning
    send_due(s)
    assert s.started == [first, first, later]
    s.close()


def test_many_held_recipients_do_not_keep_a_paced_lane_from_one_in_daylight(
    tmp_path: Path,
) -> None:
    s = quiet_stepper(tmp_path, send_interval=10.0)
    for n in range(300):
        s.accept(f"5255123{n:05d}")  # Mexico City mobiles, all at night
    s.accept(SAO_PAULO)
    reads = counting(s)
    sent: list[str] = []
    while not sent:
        s.step()
        sent = [job.message.phone for job in s.take() if job.message]
    assert sent == [SAO_PAULO]
    assert reads == [2]  # 256 + 1 read and held in one step, the rest in the next
    (view,) = s.dispatcher.lanes_view()
    assert view.quiet_held == 300
    s.close()


def test_an_instance_time_zone_holds_every_recipient_alike(tmp_path: Path) -> None:
    s = quiet_stepper(tmp_path, timezone="America/Mexico_City")
    held = s.accept(SAO_PAULO)  # daytime in Sao Paulo, but the instance says Mexico City
    assert send_due(s) == []
    row = s.store.get(held)
    assert row is not None and row.next_attempt_at == clock.to_db(MORNING_IN_MEXICO)
    s.close()


async def test_waiting_because_names_the_zone_and_the_local_end(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    # The real app on the wall clock: quiet hours from an hour ago to an hour from now in
    # Mexico City, so the message is held whenever the test runs.
    local = dt.datetime.now(zoneinfo.ZoneInfo("America/Mexico_City"))
    window = f"{local - dt.timedelta(hours=1):%H:%M}-{local + dt.timedelta(hours=1):%H:%M}"
    client = await make_client(
        fast_settings(evolution_url=fake.url, instances={"main": {"quiet_hours": window}})
    )
    task = (await post(client, phone="+525512345678"))["task_id"]
    code = (await post(client, phone="+525512345678", priority="high"))["task_id"]
    await wait_status(client, code, {"SUCCESS"})
    body = await (await client.get(f"/tasks/{task}")).json()
    assert body["status"] == "PENDING"
    assert body["result"]["waiting_because"] == (
        f"quiet hours in America/Mexico_City until {window[-5:]}"
    )
    lanes = await (await client.get("/instances")).json()
    (lane,) = [lane for lane in lanes["instances"] if lane["instance"] == "main"]
    assert (lane["quiet_hours"], lane["quiet_held"]) == (window, 1)
    assert [(end["zone"], end["held"]) for end in lane["quiet_ends"]] == [
        ("America/Mexico_City", 1)
    ]


async def test_a_message_quiet_hours_would_hold_past_its_expiry_is_refused(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    local = dt.datetime.now(zoneinfo.ZoneInfo("America/Mexico_City"))
    window = f"{local - dt.timedelta(hours=1):%H:%M}-{local + dt.timedelta(hours=1):%H:%M}"
    client = await make_client(
        fast_settings(evolution_url=fake.url, instances={"main": {"quiet_hours": window}})
    )
    message = {"phone": "+525512345678", "message": "hi", "expires_in": 600}
    resp = await client.post("/messages", json=message)
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "queue_too_slow"
    assert body["error"]["message"].startswith(
        f"quiet hours in America/Mexico_City until {window[-5:]} ("
    )
    assert 600 <= int(resp.headers["Retry-After"]) <= 3600 + 60
    # High priority ignores quiet hours; a message that can wait until morning is accepted.
    await post(client, **message, priority="high")
    await post(client, **message | {"expires_in": 7200})


def test_status_shows_quiet_hours_and_when_they_end_for_what_they_hold() -> None:
    lane = {
        "instance": "main",
        "state": "idle",
        "waiting": 3,
        "problem": None,
        "quiet_hours": "21:00-08:00",
        "quiet_held": 3,
        "quiet_ends": [  # earliest first, as /instances gives them
            {"zone": "America/Bogota", "until": "2026-12-02T13:00:00Z", "held": 1},
            {"zone": "America/Mexico_City", "until": "2026-12-02T14:00:00Z", "held": 2},
        ],
    }
    quiet_only = {**lane, "instance": "day", "quiet_held": 0, "quiet_ends": []}
    report = {"daemon": "up", "status": "ok", "instances": [lane, quiet_only]}
    assert render(report, color=False, now=NIGHT_IN_MEXICO).splitlines()[1:] == [
        "  instance main             idle         waiting 3 quiet hours 21:00-08:00 holding 3 "
        "until 2026-12-02T13:00:00Z (America/Bogota and 1 other zone)",
        "  instance day              idle         waiting 3 quiet hours 21:00-08:00",
    ]


def test_a_restart_still_shows_what_quiet_hours_hold(tmp_path: Path) -> None:
    s = quiet_stepper(tmp_path)
    s.accept(MEXICO)
    s.accept(SAO_PAULO)
    assert send_due(s) == [SAO_PAULO]
    s.close()
    s = quiet_stepper(tmp_path, now=NIGHT_IN_MEXICO + 600)
    (view,) = s.dispatcher.lanes_view()
    assert view.quiet_held == 1
    assert [(e.zone, e.until) for e in view.quiet_ends] == [
        ("America/Mexico_City", clock.to_rfc3339(MORNING_IN_MEXICO))
    ]
    assert send_due(s) == []  # not sent early, not held twice
    s.now = MORNING_IN_MEXICO
    assert send_due(s) == [MEXICO]
    s.close()


def test_a_scheduled_message_held_for_the_night_still_goes_before_a_later_one(
    tmp_path: Path,
) -> None:
    evening = utc(2026, 12, 3, 2, 0)  # 20:00 in Mexico City
    s = quiet_stepper(tmp_path, now=evening)
    first = s.accept(MEXICO, send_at=evening + 5400)  # 21:30: in the night
    s.now = evening + 6300  # 21:45
    later = s.accept(MEXICO)
    assert send_due(s) == []
    morning = utc(2026, 12, 3, 14, 0)
    for task in (first, later):
        row = s.store.get(task)
        assert row is not None and row.next_attempt_at == clock.to_db(morning)
    s.now = morning
    assert send_due(s) == [MEXICO, MEXICO]
    assert s.started == [first, later]
    s.close()


def test_the_dispatcher_holds_until_the_morning_after_the_clocks_go_forward(
    tmp_path: Path,
) -> None:
    s = quiet_stepper(tmp_path, now=utc(2026, 3, 8, 6, 30), timezone="America/New_York")
    held = s.accept(MEXICO)  # 01:30 EST; at 02:00 the clocks jump to 03:00 EDT
    assert send_due(s) == []
    row = s.store.get(held)
    assert row is not None and row.next_attempt_at == clock.to_db(utc(2026, 3, 8, 12, 0))
    s.now = utc(2026, 3, 8, 11, 59, 59)  # 07:59:59 EDT
    assert send_due(s) == []
    s.now = utc(2026, 3, 8, 12, 0)  # 08:00 EDT
    assert send_due(s) == [MEXICO]
    s.close()


def test_a_hold_the_ledger_refuses_is_tried_again_and_nothing_is_sent_meanwhile(
    tmp_path: Path,
) -> None:
    s = quiet_stepper(tmp_path)
    refusals = [StoreUnavailable("database is locked")]

    def hold(holds: list[tuple[str, str, float, str]], now: float) -> int:
        if refusals:
            raise refusals.pop()
        with s.store.transaction() as cur:
            return s.store.hold_in(cur, holds, now)

    dispatcher = Dispatcher(
        s.store, s.settings, s.jobs.extend, hold=hold, time_source=lambda: s.now
    )
    dispatcher.reload_lanes()
    night = s.accept(MEXICO)
    dispatcher.accepted({"main": 1})
    dispatcher.step()  # refused: not shown as held, nothing sent, a look again in a second
    (view,) = dispatcher.lanes_view()
    assert view.quiet_held == 0 and s.take() == [] and not refusals
    dispatcher.step()  # the same instant: the lane waits for its timer, no retry in a loop
    row = s.store.get(night)
    assert row is not None and row.next_attempt_at == row.created_at
    s.now += 1.0
    dispatcher.step()
    (view,) = dispatcher.lanes_view()
    row = s.store.get(night)
    assert view.quiet_held == 1 and s.take() == []
    assert row is not None and row.next_attempt_at == clock.to_db(MORNING_IN_MEXICO)
    s.close()
