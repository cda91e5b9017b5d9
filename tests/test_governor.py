"""Warm-up and the new-contact budget (issue 17), driven with the stepper's clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomsgd import clock
from evomsgd.cli.status import render
from evomsgd.config import LaneSettings
from evomsgd.engine.lanes import DAY, Lane, day_start
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import SENT, T0, Stepper

MIDNIGHT = day_start(T0) + DAY  # T0 is 08:00 UTC; the next UTC day begins here


def phones(count: int, prefix: str = "55119888") -> list[str]:
    return [f"{prefix}{n:05d}" for n in range(count)]


def send_all(s: Stepper) -> list[str]:
    """Step and send whatever the dispatcher hands out until it hands out nothing."""
    sent: list[str] = []
    while True:
        s.step()
        jobs = s.take()
        if not jobs:
            return sent
        for job in jobs:
            row = s.attempt(job, SENT)
            sent.append(row.phone)


def stepper(data_dir: Path, now: float = T0, **lane: Any) -> Stepper:
    return Stepper(data_dir, now=now, instances={"main": LaneSettings(**lane)})


def test_the_warm_up_doubles_the_daily_cap_and_a_restart_keeps_the_ramp(tmp_path: Path) -> None:
    s = stepper(tmp_path, warmup_days=3, warmup_start=2)
    for phone in phones(20):
        s.accept(phone, expires_in=7 * DAY)
    assert len(send_all(s)) == 2  # day 1: warmup_start
    assert s.dispatcher.waiting_because("main") == (
        "instance main has sent today's 2 messages (warm-up day 1 of 3) - it sends again at "
        f"{clock.to_rfc3339(MIDNIGHT)}"
    )
    s.now = MIDNIGHT - 1
    assert send_all(s) == []
    s.now = MIDNIGHT
    assert len(send_all(s)) == 4  # day 2: doubled
    s.close()

    s = stepper(tmp_path, now=MIDNIGHT + 3600, warmup_days=3, warmup_start=2)
    assert send_all(s) == []  # today's 4 are in the ledger; the ramp did not start over
    (view,) = s.dispatcher.lanes_view()
    assert (view.sent_today, view.daily_cap, view.warmup_day, view.warmup_days) == (4, 4, 2, 3)
    s.now = MIDNIGHT + DAY
    assert len(send_all(s)) == 8  # day 3
    s.now = MIDNIGHT + 2 * DAY
    assert len(send_all(s)) == 6  # day 4: warmed up, and no per_day: no daily cap at all
    (view,) = s.dispatcher.lanes_view()
    assert (view.sent_today, view.daily_cap, view.warmup_day) == (None, None, None)
    s.close()


def test_the_warm_up_never_exceeds_per_day_and_ends_at_it() -> None:
    lane = Lane("main", LaneSettings(warmup_days=4, warmup_start=20, per_day=50))
    lane.first_sent_at = T0
    caps = [lane.daily_cap(T0 + day * DAY) for day in range(5)]
    assert caps == [20, 40, 50, 50, None]  # after the warm-up, per_day (rolling 24 h) alone
    assert [lane.warmup_day(T0 + day * DAY) for day in range(5)] == [1, 2, 3, 4, None]


def test_an_old_number_is_not_warmed_up_again(tmp_path: Path) -> None:
    # A default warm-up for all instances: one that first sent 30 days ago is past it...
    s = Stepper(tmp_path, now=T0 - 30 * DAY, warmup_days=7, warmup_start=1)
    s.accept("5511988880000")
    assert len(send_all(s)) == 1
    s.close()
    s = Stepper(tmp_path, warmup_days=7, warmup_start=1)
    for phone in phones(5):
        s.accept(phone)
    assert len(send_all(s)) == 5
    s.close()
    # ...and one marked warmed in its section (warmup_days = 0) is never held.
    (tmp_path / "warmed").mkdir()
    s = Stepper(
        tmp_path / "warmed",
        warmup_days=7,
        warmup_start=1,
        instances={"main": LaneSettings(warmup_days=0)},
    )
    for phone in phones(5):
        s.accept(phone)
    assert len(send_all(s)) == 5
    s.close()


def test_off_by_default_nothing_is_held(tmp_path: Path) -> None:
    s = Stepper(tmp_path)
    for phone in phones(300):
        s.accept(phone)
    assert len(send_all(s)) == 300
    (view,) = s.dispatcher.lanes_view()
    assert (view.daily_cap, view.warmup_day, view.new_contacts_per_day) == (None, None, None)
    s.close()


def test_new_contacts_wait_for_the_next_day_and_known_ones_do_not(tmp_path: Path) -> None:
    s = stepper(tmp_path, now=T0 - DAY, new_contacts_per_day=2)
    s.accept("5511900000001")  # known from yesterday
    assert send_all(s) == ["5511900000001"]
    s.close()

    s = stepper(tmp_path, new_contacts_per_day=2)
    strangers = phones(3)
    for phone in strangers:
        s.accept(phone, expires_in=2 * DAY)
    s.accept("5511900000001")
    assert send_all(s) == [*strangers[:2], "5511900000001"]
    assert s.dispatcher.waiting_because("main") == (
        "instance main has written to today's 2 new contacts (new_contacts_per_day) - messages "
        f"to new contacts wait until {clock.to_rfc3339(MIDNIGHT)}"
    )
    (view,) = s.dispatcher.lanes_view()
    assert (view.new_contacts_today, view.new_contacts_per_day, view.waiting) == (2, 2, 1)
    s.accept(strangers[0])  # a second message to one sent today: known now
    assert send_all(s) == [strangers[0]]
    s.close()

    s = stepper(tmp_path, new_contacts_per_day=2)  # a restart counts today's from the ledger
    assert send_all(s) == []
    s.now = MIDNIGHT - 1
    assert send_all(s) == []
    s.now = MIDNIGHT
    assert send_all(s) == [strangers[2]]
    (view,) = s.dispatcher.lanes_view()
    assert (view.new_contacts_today, view.waiting) == (1, 0)
    s.close()


async def test_a_new_contact_that_would_expire_before_tomorrows_budget_is_refused(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, instances={"main": {"new_contacts_per_day": 1}})
    )
    first = await post(client, phone="+5511988887777")
    await wait_status(client, first["task_id"], {"SUCCESS"})
    resp = await client.post(
        "/messages", json={"phone": "+5511988886666", "message": "hi", "expires_in": 1}
    )
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "queue_too_slow"
    assert "new_contacts_per_day" in body["error"]["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= DAY
    # A known contact goes at once; a new one that can wait for tomorrow is accepted.
    await post(client, phone="+5511988887777", expires_in=1)
    await post(client, phone="+5511988886666", expires_in=2 * DAY)


def test_status_shows_todays_sends_the_warm_up_day_and_new_contacts() -> None:
    lane = {
        "instance": "main",
        "state": "idle",
        "waiting": 3,
        "problem": None,
        "sent_today": 40,
        "daily_cap": 40,
        "warmup_day": 2,
        "warmup_days": 7,
        "new_contacts_today": 12,
        "new_contacts_per_day": 20,
    }
    plain = {"instance": "old", "state": "idle", "waiting": 0, "problem": None}
    report = {"daemon": "up", "status": "ok", "instances": [lane, plain]}
    assert render(report, color=False, now=T0).splitlines()[1:] == [
        "  instance main             idle         waiting 3 sent today 40/40 warm-up day 2/7 "
        "new contacts 12/20",
        "  instance old              idle         waiting 0",
    ]


def test_the_warm_up_says_which_day_a_message_behind_the_backlog_goes() -> None:
    lane = Lane("main", LaneSettings(warmup_days=3, warmup_start=2))
    lane.first_sent_at = T0
    lane.sends.extend([T0, T0 + 1])  # day 1's 2 sent: its cap is used up
    assert lane.warmup_free_at(T0 + 2, ahead=0) == MIDNIGHT  # day 2 has 4
    assert lane.warmup_free_at(T0 + 2, ahead=3) == MIDNIGHT
    assert lane.warmup_free_at(T0 + 2, ahead=4) == MIDNIGHT + DAY  # day 3 has 8
    assert lane.warmup_free_at(T0 + 2, ahead=12) == MIDNIGHT + 2 * DAY  # warmed: no day cap
    lane.sends.clear()
    assert lane.warmup_free_at(T0 + 2, ahead=1) is None  # today's 2 have room for it
    assert Lane("main", LaneSettings()).warmup_free_at(T0, ahead=99) is None  # no warm-up


async def test_a_message_the_warm_up_cap_would_hold_past_its_expiry_is_refused(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(
            evolution_url=fake.url,
            instances={"main": {"warmup_days": 3, "warmup_start": 1}},
        )
    )
    first = await post(client, phone="+5511988887777")
    await wait_status(client, first["task_id"], {"SUCCESS"})  # day 1's one send
    resp = await client.post(
        "/messages", json={"phone": "+5511988887777", "message": "hi", "expires_in": 60}
    )
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "queue_too_slow"
    assert body["error"]["message"].startswith("instance 'main' is warming up (warmup_days)")
    assert 1 <= int(resp.headers["Retry-After"]) <= DAY
    # One that can wait for tomorrow's cap is accepted, and waits.
    later = await post(client, phone="+5511988887777", expires_in=2 * DAY)
    assert later["status"] == "PENDING"
