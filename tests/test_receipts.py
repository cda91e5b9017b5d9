"""Delivery receipts: Evolution's webhooks in, delivery states, lane health, stuck messages, the
delivery-error pause. Through the real app and the fake Evolution (which posts real webhooks),
or the dispatcher driven step by step over a real ledger for what needs a clock."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from evomsgd.engine.receipts import SECRET_HEADER, Receipts, make_secret, parse
from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome
from evomsgd.ledger import receipts as ledger
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.models import Delivery
from evomsgd.web import guards
from evomsgd.web.api import SERVICE
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import Stepper

APIKEY_IN_BODY = "instance-token-must-never-be-logged"


async def _hooked(
    make_client: MakeClient, fake: FakeEvolution, *, by_events: bool = False, **settings: Any
) -> tuple[TestClient[Any, Any], str]:
    """The app with a webhook secret, and the fake's webhook for `main` pointing at it."""
    client = await make_client(fast_settings(evolution_url=fake.url, **settings))
    secret = await asyncio.to_thread(make_secret, client.app[SERVICE].store)
    fake.webhooks["main"] = {
        "url": str(client.make_url("/webhooks/evolution")),
        "headers": {SECRET_HEADER: secret},
        "enabled": True,
        "events": ["SEND_MESSAGE", "MESSAGES_UPDATE", "CONNECTION_UPDATE"],
        "webhookByEvents": by_events,
    }
    return client, secret


async def _sent(client: TestClient[Any, Any]) -> tuple[str, str]:
    task = await post(client)
    body = await wait_status(client, task["task_id"])
    assert body["status"] == "SUCCESS", body
    return task["task_id"], body["result"]["evolution_key"]


async def _delivery(client: TestClient[Any, Any], task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get(f"/tasks/{task_id}")).json()
    return body["delivery"]


async def test_the_whole_ladder_forward_only(make_client: MakeClient, fake: FakeEvolution) -> None:
    client, _ = await _hooked(make_client, fake)
    task_id, key = await _sent(client)
    assert (await _delivery(client, task_id))["state"] == "accepted"
    for status, state in (
        ("SERVER_ACK", "server_ack"),
        ("DELIVERY_ACK", "delivered"),
        ("DELIVERY_ACK", "delivered"),  # a duplicate changes nothing
        ("SERVER_ACK", "delivered"),  # nor does a late one
        ("ERROR", "delivered"),  # a failure after delivery is not believed
        ("READ", "read"),
        ("PLAYED", "played"),
        ("READ", "played"),
    ):
        assert await fake.receipt(key, status) == 200
        assert (await _delivery(client, task_id))["state"] == state, status
    delivery = await _delivery(client, task_id)
    assert set(delivery) == {
        "state",
        "accepted_at",
        "server_ack_at",
        "delivered_at",
        "read_at",
        "played_at",
    }
    assert delivery["accepted_at"] <= delivery["server_ack_at"] <= delivery["delivered_at"]
    body = await (await client.get(f"/tasks/{task_id}")).json()
    assert body["status"] == "SUCCESS"  # status keeps its old meaning
    steps = [h["outcome"] for h in body["history"] if h["event"] == "delivery"]
    assert steps == ["server_ack", "delivered", "read", "played"]
    listed = await (await client.get("/tasks?delivery=played")).json()
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]
    assert (await (await client.get("/tasks?delivery=read,delivered")).json())["tasks"] == []
    bad = await client.get("/tasks?delivery=arrived")
    assert bad.status == 422
    metrics = await (await client.get("/metrics")).text()
    assert 'evomsgd_receipts_total{evolution_instance="main",state="played"} 1.0' in metrics
    assert 'evomsgd_receipts_total{evolution_instance="main",state="stale"} 4.0' in metrics
    assert 'evomsgd_messages_delivery{state="played"} 1.0' in metrics
    for name in ("delivered", "read"):  # each counted once, at its first receipt
        assert f'evomsgd_accept_to_{name}_seconds_count{{evolution_instance="main"}} 1.0' in metrics
        assert (
            f'evomsgd_accept_to_{name}_seconds_bucket{{evolution_instance="main",le="+Inf"}} 1.0'
            in metrics
        )


async def test_failed_receipt(make_client: MakeClient, fake: FakeEvolution) -> None:
    client, _ = await _hooked(make_client, fake)
    task_id, key = await _sent(client)
    assert await fake.receipt(key, "ERROR") == 200
    delivery = await _delivery(client, task_id)
    assert delivery["state"] == "failed"
    assert "WhatsApp reported status ERROR" in delivery["error"]
    listed = await (await client.get("/tasks?delivery=failed")).json()
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]
    # Proof of delivery outranks a failure report that came first.
    assert await fake.receipt(key, "DELIVERY_ACK") == 200
    assert (await _delivery(client, task_id))["state"] == "delivered"


async def test_receipts_before_the_201_are_applied_when_it_lands(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client, _ = await _hooked(make_client, fake)
    fake.receipts_first = True  # the webhooks are answered before the send's 201 goes out
    fake.auto_receipts = ["SERVER_ACK", "DELIVERY_ACK"]
    task_id, _ = await _sent(client)
    answers = [(body["event"], status) for _, body, status in fake.posted]
    assert answers == [("send.message", 200), ("messages.update", 200), ("messages.update", 200)]
    assert (await _delivery(client, task_id))["state"] == "delivered"
    store = client.app[SERVICE].store
    assert store.query("SELECT count(*) FROM receipts_pending") == [(0,)]


async def test_unknown_messages_are_dropped_and_counted(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client, _ = await _hooked(make_client, fake)
    assert await fake.receipt("3EB0NOTOURS", "DELIVERY_ACK") == 200
    assert await fake.receipt("3EB0INCOMING", "READ", from_me=False) == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'evomsgd_receipts_total{evolution_instance="main",state="dropped"} 1.0' in metrics
    assert client.app[SERVICE].store.query("SELECT count(*) FROM receipts_pending") == [(0,)]


@pytest.mark.parametrize("where", ["nothing", "wrong header", "wrong path"])
async def test_bad_or_missing_secret_401_nothing_changed_nothing_logged(
    make_client: MakeClient,
    fake: FakeEvolution,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    client, secret = await _hooked(make_client, fake)
    del fake.webhooks["main"]  # only the requests below reach the webhook
    task_id, key = await _sent(client)
    caplog.set_level(logging.DEBUG)
    body = {
        "event": "messages.update",
        "instance": "main",
        "data": {"keyId": key, "fromMe": True, "status": "READ"},
        "apikey": APIKEY_IN_BODY,
    }
    wrong = secret[:-4] + "AAAA"
    path, headers = "/webhooks/evolution", {}
    if where == "wrong header":
        headers = {SECRET_HEADER: wrong}
    elif where == "wrong path":
        path = f"/webhooks/evolution/key/{wrong}"
    resp = await client.post(path, json=body, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"
    assert (await _delivery(client, task_id))["state"] == "accepted"
    assert ledger.last_webhooks(client.app[SERVICE].store) == {}
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for needle in (wrong, secret, APIKEY_IN_BODY):
        assert needle not in logged


async def test_webhook_passes_the_guards_a_token_would_need(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    """With API tokens in use, and a Host that is a domain name, Evolution's POST (no Origin, no
    Bearer token) still gets through on the secret; a foreign Origin does not."""
    client, secret = await _hooked(make_client, fake)
    from evomsgd.ledger.tokens import create

    await asyncio.to_thread(create, client.app[SERVICE].store, "app")
    body = {"event": "qrcode.updated", "instance": "main", "data": {}}
    headers = {SECRET_HEADER: secret, "Host": "evomsgd.example"}
    client.app[guards.TOKENS]._read_at = float("-inf")  # re-read now: a token exists
    resp = await client.post("/webhooks/evolution", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"success": True, "outcome": "ignored"}
    assert (await client.get("/tasks", headers={"Host": "evomsgd.example"})).status == 401
    foreign = await client.post(
        "/webhooks/evolution", json=body, headers={**headers, "Origin": "https://evil.example"}
    )
    assert foreign.status == 403


async def test_by_events_and_v1_path_secret(make_client: MakeClient, fake: FakeEvolution) -> None:
    client, secret = await _hooked(make_client, fake, by_events=True)
    task_id, key = await _sent(client)
    assert await fake.receipt(key, "SERVER_ACK") == 200
    assert fake.posted[-1][0].endswith("/webhooks/evolution/messages-update")
    assert (await _delivery(client, task_id))["state"] == "server_ack"
    fake.webhooks["main"]["url"] = str(client.make_url(f"/webhooks/evolution/key/{secret}"))
    fake.webhooks["main"]["headers"] = {}
    assert await fake.receipt(key, "DELIVERY_ACK") == 200
    assert (await _delivery(client, task_id))["state"] == "delivered"
    assert "main" in ledger.last_webhooks(client.app[SERVICE].store)


async def test_body_limit_and_bad_json(make_client: MakeClient, fake: FakeEvolution) -> None:
    client, secret = await _hooked(make_client, fake)
    headers = {SECRET_HEADER: secret, "Content-Type": "application/json"}
    big = await client.post(
        "/webhooks/evolution", data=b"[" + b"0," * 40_000 + b"0]", headers=headers
    )
    assert big.status == 413
    bad = await client.post("/webhooks/evolution", data=b'{"apikey": "x"', headers=headers)
    assert bad.status == 400
    assert "apikey" not in (await bad.json())["error"]["message"]


async def test_connection_update_pauses_and_resumes_at_once(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client, _ = await _hooked(make_client, fake, probe_interval=3600.0)
    await _sent(client)  # the lane exists and is open

    async def state() -> str:
        lanes = (await (await client.get("/instances")).json())["instances"]
        return str(next(lane for lane in lanes if lane["instance"] == "main")["state"])

    assert await fake.connection_update("main", "close", 401) == 200
    assert await state() == "close"
    task = await post(client)
    body = await (await client.get(f"/tasks/{task['task_id']}")).json()
    assert "paused (close)" in body["result"]["waiting_because"]
    assert await fake.connection_update("main", "open") == 200
    assert (await wait_status(client, task["task_id"]))["status"] == "SUCCESS"


def test_parse_is_lenient() -> None:
    assert parse(None).instance is None
    assert parse({"event": "messages.update", "instance": "x", "data": "?"}).receipts == ()
    hook = parse(
        {
            "event": "MESSAGES_UPDATE",
            "instance": "x",
            "data": [
                {"keyId": "A", "fromMe": True, "status": 3},
                {"key": {"id": "B"}, "status": "PLAYED"},
                {"keyId": "C", "fromMe": True, "status": "PENDING"},
                {"keyId": "D", "fromMe": True, "status": "DELETED"},
            ],
        }
    )
    assert hook.receipts == (("A", Delivery.DELIVERED), ("B", Delivery.PLAYED))
    assert (
        parse(
            {"event": "connection.update", "instance": "x", "data": {"state": "connecting"}}
        ).connection
        is None
    )


# -- with a controllable clock ---------------------------------------------------------------


@pytest.fixture
def stepper(tmp_path: Path) -> Any:
    steps = Stepper(tmp_path, ack_timeout=600.0, delivery_errors_pause=3)
    loop = asyncio.new_event_loop()
    committer = GroupCommitter(steps.store, loop, idempotency_ttl=60.0)
    committer.start()
    receipts = Receipts(
        steps.store, committer, steps.dispatcher, steps.settings, time_source=lambda: steps.now
    )
    yield steps, receipts, loop
    committer.stop()
    loop.close()
    steps.close()


def _send(steps: Stepper, phone: str, key: str) -> str:
    task_id = steps.accept(phone)
    steps.step()
    (job,) = steps.take()
    outcome = SendOutcome(
        OutcomeKind.SENT, "handed to WhatsApp (201)", 201, key, "x@s.whatsapp.net"
    )
    assert steps.attempt(job, outcome).delivery == "accepted"
    return task_id


def test_stuck_messages_become_unconfirmed(stepper: Any) -> None:
    steps, receipts, loop = stepper
    stuck = _send(steps, "5511900000001", "3EB0STUCK")
    steps.now += 300
    acked = _send(steps, "5511900000002", "3EB0ACKED")
    steps.now += 299.0
    assert receipts.sweep(steps.now) == []
    steps.now += 1.0
    assert receipts.sweep(steps.now) == [(stuck, "main")]
    row = steps.store.get(stuck)
    assert row.delivery == "unconfirmed" and row.unconfirmed_at is not None
    assert steps.store.get(acked).delivery == "accepted"
    assert receipts.sweep(steps.now) == []  # once
    # A late server ack still moves it on: unconfirmed is "not yet known", not a verdict.
    body = {
        "event": "messages.update",
        "instance": "main",
        "data": {"keyId": "3EB0STUCK", "status": "SERVER_ACK"},
    }
    assert loop.run_until_complete(receipts.receive(body)) == "applied"
    assert steps.store.get(stuck).delivery == "server_ack"
    steps.now += 300.0
    assert receipts.sweep(steps.now) == [(acked, "main")]


def test_delivery_errors_pause_the_instance(stepper: Any) -> None:
    steps, receipts, loop = stepper
    keys = [f"3EB0FAIL{i}" for i in range(4)]
    for i, key in enumerate(keys):
        _send(steps, f"551190000001{i}", key)

    def fail(key: str) -> str:
        body = {
            "event": "messages.update",
            "instance": "main",
            "data": {"keyId": key, "fromMe": True, "status": "ERROR"},
        }
        return str(loop.run_until_complete(receipts.receive(body)))

    assert fail(keys[0]) == "applied"
    steps.now += 601.0  # out of the 10-minute window
    assert fail(keys[1]) == "applied"
    assert fail(keys[2]) == "applied"
    assert steps.store.paused_lanes() == {}
    steps.accept("5511900000099")
    steps.step()
    (job,) = steps.take()  # still sending
    steps.attempt(job, SendOutcome(OutcomeKind.SENT, "ok", 201, "3EB0OK", "x"))
    assert fail(keys[3]) == "applied"
    reason = steps.store.paused_lanes()["main"]
    assert reason is not None and "WhatsApp rejected 3 messages of instance main" in reason
    assert "evomsgd resume main" in reason
    steps.accept("5511900000100")
    steps.step()
    assert steps.take() == []  # paused: nothing goes out
    view = next(lane for lane in steps.dispatcher.lanes_view() if lane.instance == "main")
    assert view.state == "paused"


def test_cli_webhook_secret_prints_it_once_and_keeps_its_hash(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from evomsgd.cli.main import cli
    from evomsgd.engine.receipts import digest
    from evomsgd.ledger.store import Store

    result = CliRunner().invoke(cli, ["webhook", "secret", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("whk_") and len(secret) == 47
    assert result.stderr == (
        "webhook secret created. Configure it in Evolution (POST /webhook/set/INSTANCE with "
        '"headers": {"x-evomsgd-secret": SECRET}), or for v1 use the URL '
        "/webhooks/evolution/key/SECRET. It cannot be shown again.\n"
    )
    store = Store(tmp_path)
    try:
        assert ledger.secret_digest(store) == digest(secret)
        assert secret not in str(store.query("SELECT * FROM webhook_secrets"))
    finally:
        store.close()


# -- instances whose integration emits no receipts --------------------------------------------

# The 201s of a real 2.3.7 server (shared/evolution-api.md "Real 2.3.7 answers captured").
EVOLUTION_201 = (
    b'{"key": {"fromMe": true, "id": "b2388458-16cd-48dc-b75b-c2dbce61a26a", "remoteJid": '
    b'"5215512345678"}, "message": {"conversation": "Hola Carlos"}, "messageType": '
    b'"conversation", "messageTimestamp": 1796156906, "source": "unknown", "instanceId": '
    b'"cd7b71bf-c054-4ea6-b0ee-4e5010064200"}'
)
BAILEYS_201 = (
    b'{"key": {"remoteJid": "5511988887777@s.whatsapp.net", "fromMe": true, "id": '
    b'"3EB01931794A08C3BC5DD8"}, "pushName": "Voc\\u00ea", "status": "PENDING", "message": '
    b'{"conversation": "Your code is 123456"}, "messageType": "conversation", '
    b'"messageTimestamp": 1782601516, "instanceId": "6f63d2db-2c64-4135-8076-3fb20e7659ad", '
    b'"source": "web"}'
)


def test_the_201_tells_the_integration() -> None:
    from evomsgd.evolution import outcomes

    assert outcomes.classify_response(201, EVOLUTION_201).integration == "EVOLUTION"
    assert outcomes.classify_response(201, BAILEYS_201).integration == "WHATSAPP-BAILEYS"
    v1 = b'{"key": {"id": "3EB0AA", "remoteJid": "x"}, "status": "PENDING"}'
    assert outcomes.classify_response(201, v1).integration == "WHATSAPP-BAILEYS"
    # Neither sign: not guessed.
    assert outcomes.classify_response(201, b'{"key": {"id": "3EB0AA"}}').integration is None
    assert outcomes.EVOLUTION_CHANNEL == ledger.EVOLUTION_CHANNEL  # spelled in two rooms


def test_no_receipts_instance_is_never_unconfirmed(stepper: Any) -> None:
    steps, receipts, _ = stepper
    evo = steps.accept("5511900000001", instance="evo")
    steps.step()
    (job,) = steps.take()
    steps.attempt(job, outcomes_sent(EVOLUTION_201))
    baileys = _send(steps, "5511900000002", "3EB0BAILEYS")
    # The stepper's SENT outcome for main says nothing of its integration: none kept.
    assert steps.store.query(
        "SELECT instance, integration FROM lanes WHERE integration IS NOT NULL"
    ) == [("evo", "EVOLUTION")]
    steps.now += 601.0
    assert receipts.sweep(steps.now) == [(baileys, "main")]
    assert steps.store.get(evo).delivery == "accepted"


def outcomes_sent(body: bytes) -> SendOutcome:
    from evomsgd.evolution.outcomes import classify_response

    return classify_response(201, body)


async def test_no_receipts_is_shown(make_client: MakeClient, fake: FakeEvolution) -> None:
    from evomsgd.cli.status import render_task

    fake.add_instance("evo", integration="EVOLUTION")
    client, _ = await _hooked(make_client, fake)
    evo = await post(client, instance_name="evo")
    body = await wait_status(client, evo["task_id"])
    assert body["delivery"]["state"] == "accepted"
    assert body["delivery"]["note"] == "no receipts on this instance"
    assert render_task(body).splitlines()[3:5] == [
        "  delivery accepted",
        "  delivery: no receipts on this instance",
    ]
    listed = await (await client.get("/tasks?instance=evo")).json()
    assert listed["tasks"][0]["delivery"]["note"] == "no receipts on this instance"
    task_id, _ = await _sent(client)  # on main, a Baileys instance
    assert "note" not in await _delivery(client, task_id)
    rows = client.app[SERVICE].store.query("SELECT instance, integration FROM lanes")
    assert sorted(rows) == [("evo", "EVOLUTION"), ("main", "WHATSAPP-BAILEYS")]


async def test_without_webhooks_evolution_is_asked_before_a_message_is_called_unconfirmed(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    # No webhook points at evomsgd: findStatusMessage is the only way to learn what happened.
    client = await make_client(fast_settings(evolution_url=fake.url, ack_timeout=0.3))
    acked_id, acked_key = await _sent(client)
    silent = await post(client, phone="+5511988880001")
    silent_key = (await wait_status(client, silent["task_id"]))["result"]["evolution_key"]
    fake.status_updates[acked_key] += ["SERVER_ACK", "DELIVERY_ACK"]  # stored, in no set order

    async def settled() -> bool:
        states = [(await _delivery(client, t))["state"] for t in (acked_id, silent["task_id"])]
        return states == ["delivered", "unconfirmed"]

    deadline = asyncio.get_running_loop().time() + 10
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, "never looked up"
        await asyncio.sleep(0.05)
    assert fake.status_updates.get(silent_key) in (None, [])  # asked, nothing stored: unconfirmed
    metrics = await (await client.get("/metrics")).text()
    assert 'evomsgd_receipts_total{evolution_instance="main",state="delivered"} 1.0' in metrics


async def test_an_instance_with_webhooks_is_not_asked(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client, _ = await _hooked(make_client, fake, ack_timeout=0.3)
    task_id, key = await _sent(client)
    await fake.receipt(key, "SERVER_ACK")  # a webhook came: the instance has them
    fake.status_updates[key].append("READ")  # would be found if asked

    async def stays_server_ack() -> bool:
        return (await _delivery(client, task_id))["state"] == "server_ack"

    assert await stays_server_ack()
    second, second_key = await _sent(client)
    fake.status_updates[second_key].append("DELIVERY_ACK")
    deadline = asyncio.get_running_loop().time() + 10
    while (await _delivery(client, second))["state"] != "unconfirmed":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert await stays_server_ack()  # and the first was never looked up either
