"""What evomsgd believes about an instance, and what it shows and logs of it (issue-tested against
the fake Evolution server): a deleted instance, a lane that recovered, one log line per change."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from evomsgd.evolution.outcomes import InstanceState, OutcomeKind, SendOutcome, StateProbe
from evomsgd.models import Status
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import SENT, Stepper

GONE = SendOutcome(
    OutcomeKind.UNKNOWN_INSTANCE,
    "Evolution has no such instance (404) - check the instance name",
    404,
    detail='The "main" instance does not exist',
)
GONE_PROBE = StateProbe(
    InstanceState.UNKNOWN, OutcomeKind.UNKNOWN_INSTANCE, GONE.reason, http_status=404
)


async def lane_of(client: TestClient[Any, Any], instance: str = "main") -> dict[str, Any]:
    lanes = (await (await client.get("/instances")).json())["instances"]
    return next(lane for lane in lanes if lane["instance"] == instance)


async def until(client: TestClient[Any, Any], check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


# -- a deleted instance, step by step ------------------------------------------------------


def test_a_name_that_never_sent_fails_at_once(tmp_path: Path) -> None:
    s = Stepper(tmp_path)
    s.probe_answer = GONE_PROBE
    s.accept("5511900000001")
    s.step()
    (job,) = s.take()
    assert not job.instance_known
    row = s.attempt(job, GONE)
    assert (row.status, row.error_kind) == (Status.FAILURE, "unknown_instance")
    s.close()


def test_a_deleted_instance_waits_out_its_grace_then_its_messages_fail(tmp_path: Path) -> None:
    s = Stepper(tmp_path, unknown_instance_grace=900.0)
    s.store.mark_sent_once("main", s.now)  # it has sent before
    s.dispatcher.reload_lanes()
    first = s.accept("5511900000001")
    s.step()  # the first probe still finds it; then it is deleted in Evolution
    s.probe_answer = GONE_PROBE
    (job,) = s.take()
    assert job.instance_known
    assert s.attempt(job, GONE).status == Status.RETRY  # waits: it may be re-created
    (lane,) = s.dispatcher.lanes_view()
    assert (lane.state, lane.health) == ("unknown_instance", "unknown_instance")
    second = s.accept("5511900000002")
    for _ in range(3):
        s.now += 100.0
        s.step()
        assert s.take() == []  # within the grace nothing is sent, and nothing fails
    assert s.store.get(second).status == Status.PENDING  # type: ignore[union-attr]
    assert "is paused (unknown_instance)" in (s.dispatcher.waiting_because("main") or "")
    s.now += 601.0  # the grace is over
    s.step()
    for message_id in (first, second):
        row = s.store.get(message_id)
        assert row is not None and row.status == Status.FAILURE
        assert row.error_kind == "unknown_instance"
        assert row.last_error is not None
        assert "does not exist in Evolution" in row.last_error
        assert "EVOMSGD_UNKNOWN_INSTANCE_GRACE" in row.last_error
    third = s.accept("5511900000003")  # new ones fail at once, without a send
    s.step()
    assert s.take() == [] and s.store.get(third).status == Status.FAILURE  # type: ignore[union-attr]
    s.probe_answer = StateProbe(InstanceState.OPEN, None, "connected", 200)  # re-created, paired
    s.now += 60.0
    s.step()
    fourth = s.accept("5511900000004")
    s.step()
    (job,) = s.take()
    assert job.message_id == fourth
    assert s.attempt(job, SENT).status == Status.SUCCESS
    s.close()


# -- against the fake ----------------------------------------------------------------------


async def test_a_deleted_then_recreated_instance_delivers_what_waited(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, unknown_instance_grace=600))
    assert (await wait_status(client, (await post(client))["task_id"]))["status"] == "SUCCESS"
    fake.delete_instance("main")
    waiting = (await post(client))["task_id"]

    async def missing() -> bool:
        return (await lane_of(client))["state"] == "unknown_instance"

    await until(client, missing)
    task = await (await client.get(f"/tasks/{waiting}")).json()
    assert task["status"] in ("PENDING", "RETRY")
    fake.add_instance("main")  # re-created and paired again within the grace
    assert (await wait_status(client, waiting))["status"] == "SUCCESS"
    assert (await lane_of(client))["state"] in ("idle", "sending")


async def test_a_deleted_instance_fails_its_messages_after_the_grace(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, unknown_instance_grace=0.5))
    assert (await wait_status(client, (await post(client))["task_id"]))["status"] == "SUCCESS"
    fake.delete_instance("main")
    stranded = (await post(client))["task_id"]
    task = await wait_status(client, stranded, {"FAILURE"})
    assert "does not exist in Evolution" in task["result"]["error"]
    sends = len(fake.received)
    later = await wait_status(client, (await post(client))["task_id"], {"FAILURE"})
    assert later["result"]["error_kind"] == "unknown_instance"
    assert len(fake.received) == sends  # failed from what evomsgd knows, not asked again


async def test_an_unpaired_instance_logs_one_pause_and_one_resume(
    make_client: MakeClient, fake: FakeEvolution, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evomsgd.dispatcher")
    fake.set_state("main", "close")
    client = await make_client(fast_settings(evolution_url=fake.url))
    task_id = (await post(client))["task_id"]

    async def probed_twice() -> bool:
        return len([p for p in fake.state_probes if p[1] == "main"]) >= 2

    await until(client, probed_twice)  # the failed send and at least two probes have spoken
    assert (await lane_of(client))["state"] == "close"
    fake.set_state("main", "open")
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    lines = [r.getMessage() for r in caplog.records if r.name == "evomsgd.dispatcher"]
    changes = [line for line in lines if line.startswith("instance main ")]
    assert len(changes) == 2, changes
    assert changes[0].startswith("instance main paused (close): ")
    assert changes[1] == "instance main resumed (open)"


async def test_a_recovered_lane_shows_its_error_as_history(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    fake.set_state("main", "close")
    client = await make_client(fast_settings(evolution_url=fake.url))
    task_id = (await post(client))["task_id"]

    async def closed() -> dict[str, Any] | None:
        lane = await lane_of(client)
        return lane if lane["state"] == "close" else None

    lane = await until(client, closed)
    assert lane["problem"] and "pair it" in lane["problem"]
    assert lane["recovered_at"] is None
    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded"
    fake.set_state("main", "open")
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    lane = await lane_of(client)
    assert lane["problem"] is None  # nothing stops it now
    assert lane["last_error"] and "pair it" in lane["last_error"]  # kept as history
    assert lane["recovered_at"] is not None and lane["recovered_at"] >= lane["last_error_at"]
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["problems"] == []
