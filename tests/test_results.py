"""`result` of GET /tasks/{id}: only fields that apply, every one documented (README, OpenAPI)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from evomsgd.models import TaskResult
from tests.conftest import JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault

README = (Path(__file__).parents[1] / "README.md").read_text()


def no_nulls(result: dict[str, Any]) -> None:
    assert all(value is not None for value in result.values()), result


async def test_a_message_that_never_failed_has_no_error_only_why_it_waits(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", json={"reason": "maintenance"})
    task_id = (await post(client))["task_id"]
    task = await (await client.get(f"/tasks/{task_id}")).json()
    assert task["status"] == "PENDING"
    assert task["result"] == {
        "phone": "5511988887777",
        "instance": "main",
        "attempts": 0,
        "waiting_because": "instance main is paused by an operator: maintenance",
    }
    await client.post("/instances/main/resume", headers=JSON)
    await wait_status(client, task_id)


async def test_retry_has_its_error_and_unconfirmed_has_no_null_note(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, retry_delay=30))
    fake.script([Fault.SERVER_ERROR])
    retrying = await wait_status(client, (await post(client))["task_id"], {"RETRY"})
    assert retrying["result"]["success"] is False
    assert retrying["result"]["error_kind"] == "transient"
    assert "Evolution server error (500)" in retrying["result"]["error"]
    assert retrying["result"]["next_attempt_at"]
    no_nulls(retrying["result"])
    fake.script([Fault.PRISMA])
    unconfirmed = await wait_status(client, (await post(client, phone="+5511988880000"))["task_id"])
    assert unconfirmed["result"]["unconfirmed"] is True
    assert "Evolution failed to save it" in unconfirmed["result"]["note"]
    assert "evolution_key" not in unconfirmed["result"]  # absent, not null
    no_nulls(unconfirmed["result"])
    sent = await wait_status(client, (await post(client, phone="+5511988881111"))["task_id"])
    assert set(sent["result"]) == {
        "success", "phone", "instance", "attempts", "evolution_key", "remote_jid", "sent_at"
    }  # fmt: skip


async def test_list_results_follow_the_same_rules(client: TestClient[Any, Any]) -> None:
    await wait_status(client, (await post(client))["task_id"])
    listed = await (await client.get("/tasks")).json()
    for task in listed["tasks"]:
        if task["result"] is not None:
            no_nulls(task["result"])


async def test_every_result_field_is_documented_in_readme_and_openapi(
    client: TestClient[Any, Any],
) -> None:
    table = README[README.index("Every field `result` can carry") :]
    table = table[: table.index("### Other routes")]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    fields = set(TaskResult.model_fields)
    assert fields <= documented, fields - documented
    doc = await (await client.get("/openapi.json")).json()
    schema = doc["components"]["schemas"]["TaskResult"]
    assert set(schema["properties"]) == fields
    assert all(prop.get("description") for prop in schema["properties"].values())
