"""Pacing lanes, priority, scheduling, expiry and backpressure, measured at the fake server."""

from __future__ import annotations

import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evomsgd.config import LaneSettings, load_settings
from evomsgd.engine.lanes import Health, Lane
from tests.conftest import JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import SENT, T0, Stepper

# The ledger keeps times to the millisecond.
MS = 0.001


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def handed_out_at(tasks: list[dict[str, Any]]) -> list[float]:
    """When each task's first attempt was handed out (the history's `at`), in order."""
    return sorted(
        datetime.fromisoformat(
            next(h for h in t["history"] if h["event"] == "attempt")["at"].replace("Z", "+00:00")
        ).timestamp()
        for t in tasks
    )


async def test_one_instance_sends_one_at_a_time_with_the_minimum_gap(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, send_interval=0.15, send_jitter=0)
    )
    ids = [(await post(client, phone=f"+5511{988000000 + i}"))["task_id"] for i in range(5)]
    tasks = [await wait_status(client, task_id) for task_id in ids]
    assert [t["status"] for t in tasks] == ["SUCCESS"] * 5
    assert len(fake.received) == 5
    # Pacing through the real app, read from the ledger, not a stopwatch: each attempt's time is
    # when the dispatcher handed it out, by its own clock (the gaps are exact step by step below).
    assert min(gaps(handed_out_at(tasks))) >= 0.15 - MS, handed_out_at(tasks)
    # one at a time: each send was answered before the next arrived
    assert [r.number for r in fake.received] == [f"5511{988000000 + i}" for i in range(5)]


def handed_out(s: Stepper, until: float) -> dict[str, list[float]]:
    """Drive the dispatcher with its clock until `until`, jumping to each wake-up it asks for and
    playing an instant Evolution; return when each instance's sends were handed out."""
    times: dict[str, list[float]] = {}
    while s.now < until:
        wake = s.step()
        jobs = s.take()
        for job in jobs:
            times.setdefault(job.instance, []).append(round(s.now - T0, 6))
            s.attempt(job, SENT)
        if not jobs:
            assert wake >= s.now, "the dispatcher asked to wake in the past"
            s.now = max(wake, s.now + 1e-6)
    return times


def test_jitter_adds_a_random_extra_gap_within_its_bound(tmp_path: Path) -> None:
    s = Stepper(tmp_path, send_interval=0.05, send_jitter=0.15)
    for i in range(8):
        s.accept(f"5511{988000000 + i}")
    measured = gaps(handed_out(s, T0 + 3.0)["main"])
    assert len(measured) == 7
    assert min(measured) >= 0.05
    assert max(measured) <= 0.05 + 0.15
    assert max(measured) - min(measured) > 0.01  # not a fixed beat
    s.close()


def test_a_slow_instance_does_not_hold_up_the_others(tmp_path: Path) -> None:
    s = Stepper(tmp_path, send_interval=0.5, send_jitter=0)
    for i in range(3):
        s.accept(f"5511{988000000 + i}", instance="main")
        s.accept(f"5511{988100000 + i}", instance="other")
    times = handed_out(s, T0 + 2.0)
    # Each lane on its own pace: the two interleave, "other" does not wait for "main".
    assert times == {"main": [0.0, 0.5, 1.0], "other": [0.0, 0.5, 1.0]}
    s.close()


def test_in_flight_sends_are_bounded_by_the_setting_not_by_threads(tmp_path: Path) -> None:
    s = Stepper(tmp_path, send_interval=0, workers=1, max_in_flight=3)
    for i in range(4):
        s.accept(f"5511{988000000 + i}", instance="main")
        s.accept(f"5511{988100000 + i}", instance="other")
    s.step()
    first = s.take()
    assert len(first) == 3  # more than the one worker thread, and no more than the bound
    s.step()
    assert s.take() == []  # full: nothing more until one finishes
    s.attempt(first[0], SENT)
    s.step()
    assert len(s.take()) == 1  # one finished, one more goes
    s.close()


async def test_paused_instance_leaves_others_at_full_speed(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", json={"reason": "maintenance"})
    held = await post(client, instance_name="main")
    sent = await post(client, instance_name="other")
    assert (await wait_status(client, sent["task_id"]))["status"] == "SUCCESS"
    lanes = {
        lane["instance"]: lane
        for lane in (await (await client.get("/instances")).json())["instances"]
    }
    assert lanes["main"]["state"] == "paused" and lanes["main"]["paused_reason"] == "maintenance"
    waiting = await (await client.get(f"/tasks/{held['task_id']}")).json()
    assert waiting["status"] == "PENDING"
    assert (
        waiting["result"]["waiting_because"]
        == "instance main is paused by an operator: maintenance"
    )
    await client.post("/instances/main/resume", headers=JSON)
    assert (await wait_status(client, held["task_id"]))["status"] == "SUCCESS"


async def test_high_priority_overtakes_normal_messages_in_its_lane(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, send_interval=0.05, send_jitter=0)
    )
    await client.post("/instances/main/pause", headers=JSON)
    normal = [(await post(client, phone=f"+5511{988000000 + i}"))["task_id"] for i in range(3)]
    urgent = (await post(client, phone="+5511988009999", priority="high"))["task_id"]
    await client.post("/instances/main/resume", headers=JSON)
    tasks = [await wait_status(client, task_id) for task_id in [*normal, urgent]]
    assert fake.received[0].number == "5511988009999"
    assert min(gaps(handed_out_at(tasks))) >= 0.05 - MS  # still paced


async def test_send_at_keeps_a_message_scheduled_until_then(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    when = datetime.now(UTC) + timedelta(seconds=0.6)
    accepted = await post(client, send_at=when.isoformat())
    assert accepted["status"] == "SCHEDULED" and accepted["message"] == "Message scheduled"
    task = await (await client.get(f"/tasks/{accepted['task_id']}")).json()
    assert task["status"] == "SCHEDULED" and task["send_at"].startswith(
        when.strftime("%Y-%m-%dT%H:%M:%S")
    )
    done = await wait_status(client, accepted["task_id"])
    assert done["status"] == "SUCCESS"
    sent_at = datetime.fromisoformat(done["history"][0]["at"].replace("Z", "+00:00"))
    assert sent_at >= when - timedelta(milliseconds=5)


async def test_a_message_not_sent_in_time_expires_with_the_reason(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", headers=JSON)
    accepted = await post(client, expires_in=0.3)
    task = await wait_status(client, accepted["task_id"], timeout=5)
    assert task["status"] == "EXPIRED"
    assert "expired" in task["result"]["error"]
    assert task["history"][-1]["event"] == "expired"
    await client.post("/instances/main/resume", headers=JSON)
    assert fake.received == []
    retried = await client.post(f"/tasks/{accepted['task_id']}/retry", headers=JSON)
    assert retried.status == 202
    assert (await wait_status(client, accepted["task_id"]))["status"] == "SUCCESS"


async def test_cancel_before_sending_and_409_after(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", headers=JSON)
    accepted = await post(client)
    resp = await client.delete(f"/tasks/{accepted['task_id']}", headers=JSON)
    assert resp.status == 200 and (await resp.json())["status"] == "CANCELED"
    await client.post("/instances/main/resume", headers=JSON)
    sent = await post(client)
    await wait_status(client, sent["task_id"])
    late = await client.delete(f"/tasks/{sent['task_id']}", headers=JSON)
    assert late.status == 409 and "SUCCESS" in (await late.json())["error"]["message"]
    assert [r.number for r in fake.received] == ["5511988887777"]  # the canceled one never went out


async def test_backpressure_answers_429_with_retry_after(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, max_waiting=2))
    await client.post("/instances/main/pause", headers=JSON)
    await post(client)
    await post(client)
    resp = await client.post("/messages", json={"phone": "+5511988887777", "message": "third"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    assert (
        body["error"]["code"] == "queue_full" and "EVOMSGD_MAX_WAITING" in body["error"]["message"]
    )
    other = await client.post(
        "/messages", json={"phone": "+5511988887777", "message": "x", "instance_name": "other"}
    )
    assert other.status == 202  # the cap is per instance


async def test_backpressure_refuses_what_would_expire_before_its_turn(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, send_interval=10, send_jitter=0)
    )
    await client.post("/instances/main/pause", headers=JSON)
    for _ in range(3):
        await post(client)
    resp = await client.post(
        "/messages", json={"phone": "+5511988887777", "message": "otp", "expires_in": 20}
    )
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "queue_too_slow"
    assert (
        await client.post(
            "/messages", json={"phone": "+5511988887777", "message": "ok", "expires_in": 60}
        )
    ).status == 202


# -- the lane's arithmetic with a controllable clock ---------------------------------------


def lane(**settings: Any) -> Lane:
    values = {"send_interval": 1.0, "send_jitter": 0.0, **settings}
    return Lane(instance="shop", settings=LaneSettings(**values))


def test_caps_per_minute_hour_and_day() -> None:
    shop = lane(send_interval=0.0, per_minute=2, per_hour=3)
    rng = random.Random(1)
    t = 1_000_000.0
    assert shop.blocked_until(t) is None
    shop.record_send(t, rng)
    shop.record_send(t + 1, rng)
    assert shop.blocked_until(t + 2) == t + 60  # per_minute: the oldest of the last two + 60 s
    assert shop.blocked_until(t + 60.5) is None
    shop.record_send(t + 61, rng)
    assert shop.blocked_until(t + 62) == t + 3600  # per_hour reached
    assert shop.blocked_until(t + 3601) is None


def test_gap_and_jitter_bounds() -> None:
    shop = lane(send_interval=2.0, send_jitter=1.0)
    rng = random.Random(7)
    starts = []
    t = 0.0
    for _ in range(50):
        shop.record_send(t, rng)
        starts.append(t)
        t = shop.next_send_at
    measured = gaps(starts)
    assert all(2.0 <= g <= 3.0 for g in measured)
    assert len({round(g, 3) for g in measured}) > 10


def test_blocked_states() -> None:
    shop = lane()
    shop.in_flight.add("a")
    assert shop.blocked_until(0) == float("inf")  # one at a time
    shop.in_flight.clear()
    shop.health, shop.next_probe_at = Health.CLOSE, 42.0
    assert shop.blocked_until(0) == 42.0 and shop.state(0) == "close"
    shop.health = Health.OPEN
    shop.held_until = 10.0
    assert shop.blocked_until(0) == 10.0 and shop.state(0) == "held"
    shop.operator_paused = True
    assert shop.blocked_until(0) == float("inf") and shop.state(0) == "paused"


def test_per_instance_settings_come_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "evomsgd.toml"
    path.write_text("send_interval = 2.0\n[instances.shop]\nsend_interval = 0.5\nper_minute = 30\n")
    settings = load_settings({"config_file": path}, env={"EVOMSGD_SEND_JITTER": "0.25"})
    assert settings.lane("shop") == LaneSettings(
        send_interval=0.5,
        send_jitter=0.25,
        per_minute=30,
        max_waiting=10_000,
        warmup_days=0,  # the defaults: warm-up and new-contact budget off
        warmup_start=20,
        new_contacts_per_day=0,
        quiet_hours="",  # quiet hours and typing: off
        timezone="",
        typing=False,
    )
    assert settings.lane("clinic").send_interval == 2.0
    flagged = load_settings({"config_file": path, "workers": 7}, env={"EVOMSGD_WORKERS": "3"})
    assert flagged.workers == 7  # flag > env > file


def test_bad_settings_name_the_variable() -> None:
    from evomsgd.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"EVOMSGD_SEND_INTERVAL: Input should be greater than or equal to 0"
    ):
        load_settings(env={"EVOMSGD_SEND_INTERVAL": "-1"})
    with pytest.raises(ConfigError, match=r"EVOMSGD_SANDBOX='maybe' is not a boolean"):
        load_settings(env={"EVOMSGD_SANDBOX": "maybe"})
    assert time.time() > 0


def test_probes_of_many_new_lanes_are_spread_not_synchronised(tmp_path: Path) -> None:
    s = Stepper(tmp_path, probe_interval=30.0)
    for i in range(200):
        s.accept(f"5511{988000000 + i}", instance=f"shop-{i:03d}")
    probed_at: dict[str, float] = {}
    while s.now < T0 + 6.0:
        s.step()
        s.take()  # an unprobed lane may send meanwhile; these sends stay in flight
        for instance in s.probes:
            probed_at.setdefault(instance, s.now - T0)
        s.now += 0.1
    assert len(probed_at) == 200  # every lane probed within min(interval, 5 s)
    assert max(probed_at.values()) <= 5.1
    per_tenth = [
        sum(1 for t in probed_at.values() if k / 10 <= t < (k + 1) / 10) for k in range(51)
    ]
    assert max(per_tenth) <= 20  # 200 over 5 s: about 4 per 0.1 s, never all at once
