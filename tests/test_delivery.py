"""Delivery through the real app and the fake Evolution server: every row of the contract table."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from evomsgd.evolution.outcomes import OutcomeKind
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault, Reply

PHONE = "5511988887777"


async def wait_lane(
    client: TestClient[Any, Any], instance: str, states: set[str], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll /health until the instance's lane is in one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        health = await (await client.get("/health")).json()
        lanes = {lane["instance"]: lane for lane in health["instances"]}
        if instance in lanes and lanes[instance]["state"] in states:
            return lanes[instance]
        assert time.monotonic() < deadline, (
            f"lane {instance} never reached {states}: {lanes.get(instance)}"
        )
        await asyncio.sleep(0.02)


def ledger(tmp_path: Path, task_id: str) -> dict[str, Any]:
    with sqlite3.connect(tmp_path / "evomsgd.db") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM messages WHERE id = ?", (task_id,)).fetchone()
        return dict(row)


# fault -> (final status, attempts, retries spent, words the reason must contain)
PERMANENT = {
    Fault.SCHEMA: "instance requires property",
    Fault.BLANK_TEXT: "Text is required",
    Fault.MALFORMED_JSON: "",
    Fault.NOT_ON_WHATSAPP: "not on WhatsApp",
    Fault.UNKNOWN_INSTANCE: "does not exist",
}


@pytest.mark.parametrize("fault", list(PERMANENT))
async def test_permanent_errors_fail_at_once_with_the_reason(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path, fault: Fault
) -> None:
    fake.script([fault])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "FAILURE"
    assert task["attempts"] == 1 and len(fake.received) == 1
    assert PERMANENT[fault].lower() in task["result"]["error"].lower()
    assert task["result"]["success"] is False
    assert ledger(tmp_path, task["task_id"])["retries_used"] == 0


TRANSIENT = [
    Fault.CONNECTION_CLOSED,
    Fault.TIMED_OUT,
    Fault.SESSION_ERROR,
    Fault.LOADING,
    Fault.CONNECTION_CLOSED_500,
    Fault.TIMED_OUT_500,
    Fault.SERVER_ERROR,
    Fault.UNAVAILABLE,
]


@pytest.mark.parametrize("fault", TRANSIENT)
async def test_transient_errors_are_retried_then_sent(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path, fault: Fault
) -> None:
    fake.script([fault, fault])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    assert task["attempts"] == 3 and len(fake.received) == 3
    assert [h["outcome"] for h in task["history"]] == ["transient", "transient", "sent"]
    assert ledger(tmp_path, task["task_id"])["retries_used"] == 2


async def test_retries_stop_after_the_budget_with_the_reason(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, max_retries=3, retry_delay=0.1)
    )
    fake.script([Fault.CONNECTION_CLOSED] * 5)
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "FAILURE"
    assert task["attempts"] == 4  # 1 + 3 retries
    assert "gave up after 4 attempts" in task["result"]["error"]
    assert "Connection Closed" in task["result"]["error"]
    arrivals = [r.at for r in fake.received]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap >= 0.1 for gap in gaps), gaps  # retry_delay respected


async def test_sent_but_evolution_db_failed_is_never_resent(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path
) -> None:
    fake.script([Fault.PRISMA])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    assert task["result"]["unconfirmed"] is True
    assert "evolution_key" not in task["result"]  # no key: absent, never null
    assert len(fake.received) == 1


@pytest.mark.parametrize(
    "fault", [Fault.UNAUTHORIZED, Fault.WRONG_PATH, Fault.LICENSE, Fault.CORS, Fault.NOT_PAIRED]
)
async def test_upstream_and_config_errors_pause_the_instance_without_burning_retries(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path, fault: Fault
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, max_retries=0))
    fake.script([fault, fault])
    task = await wait_status(client, (await post(client))["task_id"], timeout=15)
    # Two failures with max_retries=0 would be a FAILURE if they spent the budget.
    assert task["status"] == "SUCCESS"
    kinds = [h["outcome"] for h in task["history"] if h["event"] == "attempt"]
    assert kinds[-1] == "sent" and set(kinds[:-1]) <= {"config_error", "upstream_down"}
    assert len(fake.state_probes) >= 1  # it probed connectionState before resuming
    assert ledger(tmp_path, task["task_id"])["retries_used"] == 0


async def test_config_error_says_so_plainly_while_the_message_waits(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.api_key = "rotated-key"  # our key is now wrong: every send and probe gets 401
    accepted = await post(client)
    # Whichever meets the 401 first - a send (RETRY, the message's own error) or the probe (the
    # lane pauses and the message, never sent, is PENDING) - the task says why it waits.
    # A message never attempted has no error, only why it waits; a failed attempt has its error.
    deadline = time.monotonic() + 10
    while True:
        task = await (await client.get(f"/tasks/{accepted['task_id']}")).json()
        why = (task["result"] or {}).get(
            "error" if task["status"] == "RETRY" else "waiting_because"
        )
        if why and "EVOLUTION_API_KEY" in why:
            break
        assert time.monotonic() < deadline, task
        await asyncio.sleep(0.02)
    assert task["status"] in ("PENDING", "RETRY")
    if task["status"] == "PENDING":
        assert "error" not in task["result"] and "success" not in task["result"], task
    health = await (await client.get("/health")).json()
    lane = health["instances"][0]
    assert lane["state"] == "config_error" and "401" in lane["last_error"]
    assert health["status"] == "degraded"


async def test_rate_limit_rests_the_instance_and_does_not_spend_retries(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, max_retries=0, rate_limit_pause=0.3)
    )
    fake.script([Fault.RATE_LIMIT])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    first, second = fake.received
    assert second.at - first.at >= 0.3
    assert ledger(tmp_path, task["task_id"])["retries_used"] == 0


NOT_DELIVERED = Reply(502, "<html>502 Bad Gateway</html>", delivered=False)


@pytest.mark.parametrize("fault", [Fault.BAD_GATEWAY, Fault.GATEWAY_TIMEOUT, NOT_DELIVERED])
async def test_an_ambiguous_send_evolution_does_not_have_is_looked_up_then_resent_flagged(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path, fault: Fault | Reply
) -> None:
    fake.script([fault])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    assert task["result"]["possibly_duplicated"] is True
    assert [(h["event"], h["outcome"]) for h in task["history"]] == [
        ("attempt", "ambiguous"),
        ("lookup", None),
        ("attempt", "sent"),
    ]
    assert "may have been delivered" in task["history"][0]["detail"]
    assert task["history"][1]["detail"].startswith(
        "not among Evolution's messages to 5511988887777@s.whatsapp.net since "
    )
    assert fake.lookups == 1
    assert len(fake.received) == 2 and len(fake.delivered) == 1
    assert task["result"]["evolution_key"] == fake.delivered[0].key_id
    assert ledger(tmp_path, task["task_id"])["ambiguous"] == 1


@pytest.mark.parametrize("fault", [Fault.DROP, Fault.OK_NO_KEY])
async def test_an_ambiguous_send_evolution_stored_is_found_and_not_sent_again(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path, fault: Fault
) -> None:
    # DROP: delivered, then the connection closes before the answer - the duplicate seen on a
    # real server when the resend went out blind.
    fake.script([fault])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    assert len(fake.received) == 1  # no second send
    assert task["result"]["evolution_key"] == fake.delivered[0].key_id
    assert task["result"]["remote_jid"] == "5511988887777@s.whatsapp.net"
    assert "possibly_duplicated" not in task["result"]  # one copy at Evolution: settled
    assert [h["outcome"] for h in task["history"]] == ["ambiguous", "found"]
    assert task["history"][1]["detail"].startswith(
        f"Evolution already has it (key {fake.delivered[0].key_id}, stored at "
    )
    assert task["history"][1]["detail"].endswith("its answer was lost - not sent again")
    assert task["delivery"]["state"] == "accepted"  # receipts for that key now apply
    row = ledger(tmp_path, task["task_id"])
    assert (row["ambiguous"], row["error_kind"]) == (1, "found")


async def test_a_hanging_send_is_found_after_the_pause_not_sent_again(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, evolution_timeout=0.3))
    fake.hang_seconds = 5
    fake.script([Fault.HANG])  # delivered, answered only after our timeout
    task = await wait_status(client, (await post(client))["task_id"], timeout=10)
    assert task["status"] == "SUCCESS"
    assert [h["outcome"] for h in task["history"]] == ["ambiguous", "found"]
    assert len(fake.received) == 1
    assert task["result"]["evolution_key"] == fake.delivered[0].key_id
    fake.release()


async def test_a_lookup_takes_no_key_recorded_for_another_message(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    # The same text to the same recipient twice: Evolution holds both copies; the first is
    # the first message's (recorded), so the second message's look-up must take only its own.
    first = await wait_status(client, (await post(client))["task_id"])
    fake.script([Fault.DROP])
    second = await wait_status(client, (await post(client))["task_id"])
    assert [h["outcome"] for h in second["history"]] == ["ambiguous", "found"]
    assert first["result"]["evolution_key"] == fake.delivered[0].key_id
    assert second["result"]["evolution_key"] == fake.delivered[1].key_id
    assert "possibly_duplicated" not in second["result"]
    assert len(fake.received) == 2


async def test_without_the_lookup_route_an_ambiguous_send_is_resent_flagged(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.find_messages_route = False  # an older server: 404 "Cannot POST /chat/findMessages/main"
    fake.script([Fault.DROP])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS"
    assert task["result"]["possibly_duplicated"] is True
    assert [h["event"] for h in task["history"]] == ["attempt", "lookup", "attempt"]
    assert task["history"][1]["detail"] == (
        "could not look it up in Evolution (Evolution has no such route (404) - check "
        "EVOLUTION_API_URL); sent again"
    )
    assert fake.lookups == 1
    assert len(fake.delivered) == 2  # the duplicate the look-up would have prevented, flagged


async def test_a_second_ambiguous_outcome_fails_instead_of_risking_more_duplicates(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.find_messages_route = False
    fake.script([Fault.DROP, Fault.DROP, Fault.OK])
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "FAILURE"
    assert "not sent again to avoid a duplicate" in task["result"]["error"]
    assert len(fake.received) == 2


async def test_evolution_hanging_times_out_as_ambiguous_without_a_storm(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, evolution_timeout=0.3, ambiguous_retries=1)
    )
    fake.find_messages_route = False
    fake.hang_seconds = 5
    fake.script([Fault.HANG, Fault.HANG])
    task = await wait_status(client, (await post(client))["task_id"], timeout=10)
    assert task["status"] == "FAILURE"
    assert [h["outcome"] for h in task["history"] if h["event"] == "attempt"] == [
        "ambiguous",
        "ambiguous",
    ]
    assert len(fake.received) == 2  # one resend, no storm
    fake.release()


async def test_evolution_unreachable_then_back_loses_and_fails_nothing(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, max_retries=0, probe_interval=0.2)
    )
    await fake.go_down()
    ids = [(await post(client, phone=f"+55119888877{i:02d}"))["task_id"] for i in range(5)]
    # Either the connection-state probe or a refused send finds Evolution down first.
    lane = await wait_lane(client, "main", {"down"})
    assert "Evolution" in lane["last_error"]
    for task_id in ids:
        task = await (await client.get(f"/tasks/{task_id}")).json()
        assert task["status"] in ("PENDING", "RETRY")
        if task["status"] == "RETRY":
            assert task["result"]["error_kind"] == OutcomeKind.UPSTREAM_DOWN.value
    await fake.go_up()
    finals = [await wait_status(client, task_id, timeout=15) for task_id in ids]
    assert [t["status"] for t in finals] == ["SUCCESS"] * 5
    assert sorted(r.number for r in fake.delivered) == sorted(
        f"55119888877{i:02d}" for i in range(5)
    )


async def test_closed_instance_pauses_its_lane_but_not_the_others(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, probe_interval=0.2))
    fake.set_state("main", "close")
    stuck = await post(client, instance_name="main")
    free = await post(client, instance_name="other")
    assert (await wait_status(client, free["task_id"]))["status"] == "SUCCESS"
    health = await (await client.get("/health")).json()
    lanes = {lane["instance"]: lane for lane in health["instances"]}
    task = await (await client.get(f"/tasks/{stuck['task_id']}")).json()
    assert task["status"] in ("PENDING", "RETRY")
    assert lanes["main"]["state"] in (
        "close",
        "down",
    )  # a probe or a failed send, whichever came first
    fake.set_state("main", "open")
    assert (await wait_status(client, stuck["task_id"], timeout=10))["status"] == "SUCCESS"


async def test_v1_servers_get_the_v1_body(make_client: MakeClient) -> None:
    from tests.conftest import API_KEY

    async with FakeEvolution(api_key=API_KEY, instances=["main"], api_version=1) as v1:
        client = await make_client(fast_settings(evolution_url=v1.url, evolution_api_version=1))
        task = await wait_status(client, (await post(client))["task_id"])
        assert task["status"] == "SUCCESS"
        assert v1.received[0].body["textMessage"] == {"text": "Your code is 123456"}


async def test_sandbox_sends_nothing_and_says_so(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(sandbox=True, evolution_url=None, evolution_key=None))
    task = await wait_status(client, (await post(client))["task_id"])
    assert task["status"] == "SUCCESS" and task["sandbox"] is True
    assert task["result"]["sandbox"] is True and task["result"]["evolution_key"].startswith(
        "SANDBOX-"
    )
    assert fake.received == []
    health = await (await client.get("/health")).json()
    assert health["sandbox"] is True and "SANDBOX" in health["problems"][0]
