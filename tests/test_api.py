"""The HTTP API through the real app: shapes old clients rely on, and one error shape for all."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from evomsgd.app import QUEUE
from evomsgd.models import ErrorBody
from evomsgd.web.api import SERVICE
from tests.conftest import API_KEY, FOREIGN, JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution


async def test_post_answers_202_with_the_old_stacks_shape(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    resp = await client.post(
        "/messages",
        json={"phone": "+5511988887777", "message": "Hola Carlos", "instance_name": "main"},
    )
    assert resp.status == 202
    body = await resp.json()
    assert body["success"] is True
    assert isinstance(body["message"], str) and body["message"]
    assert len(body["task_id"]) == 36
    done = await wait_status(client, body["task_id"])
    assert done["status"] == "SUCCESS"
    result = done["result"]
    assert result["success"] is True
    assert result["phone"] == "5511988887777"
    sent = fake.received[-1]
    assert result["evolution_key"] == sent.key_id
    assert result["remote_jid"] == "5511988887777@s.whatsapp.net"
    assert sent.text == "Hola Carlos" and sent.instance == "main"
    assert sent.body == {"number": "5511988887777", "text": "Hola Carlos", "linkPreview": False}


async def test_instance_name_is_optional_and_defaults_to_the_configured_one(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    accepted = await post(client)
    await wait_status(client, accepted["task_id"])
    assert fake.received[-1].instance == "main"


async def test_unknown_fields_are_ignored_so_old_clients_keep_working(
    client: TestClient[Any, Any],
) -> None:
    accepted = await post(client, delay=1200, something_else=True)
    assert (await wait_status(client, accepted["task_id"]))["status"] == "SUCCESS"


async def test_the_202_comes_after_the_row_is_committed(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    accepted = await post(client, send_at="2099-01-01T00:00:00Z")
    # A separate connection (like an operator's sqlite3) sees the row as soon as the 202 arrived.
    with sqlite3.connect(tmp_path / "evomsgd.db") as conn:
        row = conn.execute(
            "SELECT status, phone, phone_input, text, instance FROM messages WHERE id = ?",
            (accepted["task_id"],),
        ).fetchone()
    assert row == ("SCHEDULED", "5511988887777", "+5511988887777", "Your code is 123456", "main")


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"phone", "message"}),
        ({"phone": "+5511988887777"}, {"message"}),
        ({"message": "hi"}, {"phone"}),
        ({"phone": 5511988887777, "message": "hi"}, {"phone"}),
        ({"phone": "+5511988887777", "message": ["hi"]}, {"message"}),
        ({"phone": "+5511988887777", "message": ""}, {"message"}),
        ({"phone": "+5511988887777", "message": "   "}, {"message"}),
        ({"phone": "12", "message": "hi"}, {"phone"}),
        ({"phone": "+5511988887777", "message": "hi", "instance_name": "a/b"}, {"instance_name"}),
        ({"phone": "+5511988887777", "message": "hi", "priority": "urgent"}, {"priority"}),
        ({"phone": "+5511988887777", "message": "hi", "send_at": "tomorrow"}, {"send_at"}),
        (
            {"phone": "+5511988887777", "message": "hi", "send_at": "2030-01-01T10:00:00"},
            {"send_at"},
        ),
        ({"phone": "+5511988887777", "message": "hi", "expires_in": -5}, {"expires_in"}),
        ({"phone": "+5511988887777", "message": "x" * 4097}, {"message"}),
    ],
)
async def test_invalid_fields_get_422_naming_each_field(
    client: TestClient[Any, Any], body: dict[str, Any], fields: set[str]
) -> None:
    resp = await client.post("/messages", json=body)
    assert resp.status == 422
    data = await resp.json()
    ErrorBody.model_validate(data)
    assert data["error"]["code"] == "validation_error"
    assert {d["field"] for d in data["error"]["details"]} == fields
    for field in fields:
        assert field in data["error"]["message"]


async def test_missing_default_instance_is_explained(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, default_instance=None))
    resp = await client.post("/messages", json={"phone": "+5511988887777", "message": "hi"})
    data = await resp.json()
    assert resp.status == 422
    assert "EVOLUTION_INSTANCE_NAME" in data["error"]["message"]


async def test_json_in_utf16_or_with_a_bom_is_read_like_utf8(client: TestClient[Any, Any]) -> None:
    """RFC 8259 readers may accept these; json.loads does, and so did evomsgd before its fast path."""
    body = json.dumps({"phone": "+5511988887777", "message": "olá"})
    for raw in (body.encode("utf-16"), body.encode("utf-8-sig")):
        resp = await client.post("/messages", data=raw, headers=JSON)
        assert resp.status == 202, await resp.text()
        stored = client.app[SERVICE].store.get((await resp.json())["task_id"])
        assert stored is not None and stored.text == "olá" and stored.phone == "5511988887777"


async def test_every_error_has_the_one_json_shape(client: TestClient[Any, Any]) -> None:
    """Walk every failure mode the API has and check each against ErrorBody."""
    accepted = await post(client)
    done = await wait_status(client, accepted["task_id"])
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/messages", {"data": b"{not json", "headers": JSON}, 400),
        ("POST", "/messages", {"data": b"\xff\xfe", "headers": JSON}, 400),
        ("POST", "/messages", {"json": [1, 2]}, 422),
        ("POST", "/messages", {"json": {}}, 422),
        ("POST", "/messages", {"data": b"x" * (70 * 1024), "headers": JSON}, 413),
        ("POST", "/messages", {"data": b"phone=1&message=hi"}, 415),
        (
            "POST",
            "/messages",
            {
                "json": {"phone": "+5511988887777", "message": "hi"},
                "headers": {"Idempotency-Key": "k" * 201},
            },
            400,
        ),
        ("GET", "/tasks/nope", {}, 404),
        ("DELETE", "/tasks/nope", {"headers": JSON}, 404),
        ("DELETE", f"/tasks/{done['task_id']}", {"headers": JSON}, 409),
        ("POST", f"/tasks/{done['task_id']}/retry", {"headers": JSON}, 409),
        ("POST", "/tasks/nope/retry", {"headers": JSON}, 404),
        (
            "POST",
            "/messages",
            {"json": {"phone": "+5511988887777", "message": "hi"}, "headers": FOREIGN},
            403,
        ),
        ("GET", "/tasks?status=BOGUS", {}, 422),
        ("GET", "/tasks?limit=0", {}, 422),
        ("GET", "/tasks?limit=abc", {}, 422),
        ("GET", "/tasks?since=yesterday", {}, 422),
        # Found by schemathesis: values SQLite or the ledger's timestamps cannot hold were 500s.
        ("GET", "/tasks?before=-335058567510403114336256", {}, 422),
        ("GET", "/tasks?since=99999999999d", {}, 422),
        ("GET", "/tasks?until=0001-01-01T00:00:00%2B01:00", {}, 422),
        (
            "POST",
            "/messages",
            {
                "json": {
                    "phone": "+5511988887777",
                    "message": "hi",
                    "send_at": "0001-01-01T00:00:00+01:00",
                }
            },
            422,
        ),
        ("GET", "/no/such/route", {}, 404),
        ("PUT", "/messages", {}, 405),
    ]
    for method, path, kwargs, status in cases:
        resp = await client.request(method, path, **kwargs)
        assert resp.status == status, (method, path, await resp.text())
        assert resp.content_type == "application/json"
        data = await resp.json()
        ErrorBody.model_validate(data)
        assert data["success"] is False and data["error"]["message"], (method, path, data)


async def test_unknown_task_is_404(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/tasks/3f1c1d2e-0000-4000-8000-000000000000")
    assert resp.status == 404
    assert "no task" in (await resp.json())["error"]["message"]


async def test_root_and_health(client: TestClient[Any, Any], fake: FakeEvolution) -> None:
    root = await (await client.get("/")).json()
    assert root["status"] == "ok" and root["service"] == "evomsgd"
    await wait_status(client, (await post(client))["task_id"])
    resp = await client.get("/health")
    assert resp.status == 200
    health = await resp.json()
    assert health["status"] == "ok"
    assert health["evolution_url"] == fake.url
    assert health["database_writable"] is True
    assert health["workers_alive"] == health["workers_configured"] == 2
    assert health["counts"]["SUCCESS"] == 1
    assert health["oldest_waiting_seconds"] is None
    assert health["uptime_seconds"] >= 0
    assert [lane["instance"] for lane in health["instances"]] == ["main"]
    assert API_KEY not in await resp.text()


async def test_health_reports_oldest_waiting_message(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    await client.post("/instances/main/pause", headers=JSON)
    accepted = await post(client)
    health = await (await client.get("/health")).json()
    assert health["counts"]["PENDING"] == 1
    assert health["oldest_waiting_seconds"] is not None and health["oldest_waiting_seconds"] >= 0
    await client.post("/instances/main/resume", headers=JSON)
    assert (await wait_status(client, accepted["task_id"]))["status"] == "SUCCESS"


async def test_health_is_503_when_the_workers_are_dead(client: TestClient[Any, Any]) -> None:
    queue = client.app[QUEUE]
    queue.consumer.stop_flag.set()
    queue.storage.shut()
    for _, thread in queue.consumer.worker_threads:
        thread.join(5)
    resp = await client.get("/health")
    assert resp.status == 503
    data = await resp.json()
    assert data["status"] == "down"
    assert any("worker" in p for p in data["problems"])


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root can write a read-only file; covered by the chmod-free test"
)
async def test_health_is_503_when_the_database_is_read_only(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    os.chmod(tmp_path / "evomsgd.db", 0o400)
    resp = await client.get("/health")
    assert resp.status == 503


async def test_health_is_503_when_the_ledger_cannot_take_a_write(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """An operator's sqlite3 holding the write lock: /health says so instead of hanging."""

    client.app[SERVICE].store.busy_timeout = 0.1
    client.app[SERVICE].store._conn.execute("PRAGMA busy_timeout=100")
    operator = sqlite3.connect(tmp_path / "evomsgd.db", isolation_level=None)
    operator.execute("BEGIN IMMEDIATE")
    try:
        resp = await client.get("/health")
        data = await resp.json()
        assert resp.status == 503 and data["database_writable"] is False
        send = await client.post("/messages", json={"phone": "+5511988887777", "message": "hi"})
        assert send.status == 503
        assert (await send.json())["error"]["code"] == "store_unavailable"
    finally:
        operator.execute("ROLLBACK")
        operator.close()
    assert (await client.get("/health")).status == 200


async def test_openapi_is_generated_from_the_request_models(client: TestClient[Any, Any]) -> None:
    from evomsgd.models import SendRequest

    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    schema = spec["components"]["schemas"]["SendRequest"]
    assert schema["properties"]["phone"] == SendRequest.model_json_schema()["properties"]["phone"]
    assert set(schema["required"]) == {"phone"}
    # message may be left out only beside media (issue 16): said in the schema, not only in words
    assert schema["anyOf"] == [{"required": ["message"]}, {"required": ["media"]}]
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    api_routes = {
        r
        for r in routes
        if not r[1].startswith(("/docs", "/openapi", "/dashboard", "/metrics", "/static", "/stats"))
    }
    assert api_routes <= documented, api_routes - documented


async def test_docs_page_and_its_assets_are_served_offline(client: TestClient[Any, Any]) -> None:
    page = await client.get("/docs")
    html = await page.text()
    assert page.status == 200 and "swagger-ui" in html
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    for asset in (
        "/docs/static/swagger-ui-bundle.js",
        "/docs/static/swagger-ui.css",
        "/docs/init.js",
    ):
        resp = await client.get(asset)
        assert resp.status == 200, asset
        assert len(await resp.read()) > 20


async def test_task_shows_history_and_list_filters(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.script(["blank_text"], number="5511988887777")
    bad = await post(client)
    good = await post(client, phone="+5215512345678")
    failed = await wait_status(client, bad["task_id"])
    await wait_status(client, good["task_id"])
    assert failed["status"] == "FAILURE"
    assert failed["history"][0]["event"] == "attempt"
    assert failed["history"][0]["http_status"] == 400
    page = await (await client.get("/tasks?status=FAILURE")).json()
    assert [t["task_id"] for t in page["tasks"]] == [bad["task_id"]]
    page = await (await client.get("/tasks?phone=525512345678&since=1h")).json()
    assert [t["task_id"] for t in page["tasks"]] == [good["task_id"]]
    first = await (await client.get("/tasks?limit=1")).json()
    assert first["tasks"][0]["task_id"] == good["task_id"] and first["next_before"]
    second = await (await client.get(f"/tasks?limit=1&before={first['next_before']}")).json()
    assert second["tasks"][0]["task_id"] == bad["task_id"]


async def test_key_never_in_responses(client: TestClient[Any, Any], fake: FakeEvolution) -> None:
    fake.script(["unauthorized"])
    accepted = await post(client)
    task = await wait_status(client, accepted["task_id"], {"RETRY", "PENDING"}, timeout=5)
    texts = [json.dumps(task)]
    for path in (
        "/health",
        "/instances",
        f"/tasks/{accepted['task_id']}",
        "/tasks",
        "/openapi.json",
    ):
        texts.append(await (await client.get(path)).text())
    assert not any(API_KEY in text for text in texts)


async def test_idempotency_key_replays_and_conflicts(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    body = {"phone": "+5511988887777", "message": "Order 1042 shipped"}
    first = await client.post("/messages", json=body, headers={"Idempotency-Key": "order-1042"})
    assert first.status == 202
    task_id = (await first.json())["task_id"]
    again = await client.post(
        "/messages", json={**body, "unknown": 1}, headers={"Idempotency-Key": "order-1042"}
    )
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["task_id"] == task_id
    other = await client.post(
        "/messages",
        json={**body, "message": "different"},
        headers={"Idempotency-Key": "order-1042"},
    )
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "idempotency_conflict"
    await wait_status(client, task_id)
    assert len(fake.received) == 1
