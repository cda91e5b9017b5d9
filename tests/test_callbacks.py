"""Signed status callbacks (issue 15): the outbox the ledger's triggers write, the sender driven
step by step against a real HTTP receiver that verifies with `standardwebhooks`, and the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from standardwebhooks import WebhookVerificationError

from evomsgd import clock
from evomsgd.config import LaneSettings, Settings
from evomsgd.engine.callbacks import CallbackSender, backoff, retry_after
from evomsgd.engine.receipts import SECRET_HEADER, make_secret
from evomsgd.ledger import callbacks as ledger
from evomsgd.ledger import receipts
from evomsgd.ledger import tokens as ledger_tokens
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.records import NewMessage, Receipt, Transition
from evomsgd.ledger.store import Store
from evomsgd.models import Status
from evomsgd.web import guards
from evomsgd.web.api import SERVICE
from tests.conftest import JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.receiver import Call, Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_dGhlIG90aGVyIHNlY3JldCwgMzIgYnl0ZXMgbG9uZyE="


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _new(i: int, *, callback_to: str | None = "default", **overrides: Any) -> NewMessage:
    now = clock.now()
    values: dict[str, Any] = {
        "id": f"task-{i:03d}",
        "instance": "main",
        "phone": f"55119888{i:05d}",
        "phone_input": f"+55119888{i:05d}",
        "text": f"code {i}",
        "priority": 0,
        "created_at": now,
        "send_at": None,
        "expires_at": now + 3600,
        "sandbox": False,
        "callback_to": callback_to,
    }
    values.update(overrides)
    return NewMessage(**values)


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition on the ledger (read in a thread), not for a duration."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)


def _types(store: Store, message_id: str) -> list[str]:
    return [row.type for row in reversed(ledger.listing(store, message_id=message_id))]


# -- the outbox: every path that changes a status writes its row, in the same transaction ------


def test_every_status_and_delivery_change_writes_its_callback(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/cb", SECRET, False, 60, clock.now())
    store.insert_messages([_new(i) for i in range(8)] + [_new(99, callback_to=None)])
    now = clock.now()

    def attempt(message_id: str, tr: Transition) -> None:
        msg = store.claim(message_id, now, 30)
        assert msg is not None
        assert store.finish_attempt(msg, now, now, tr)

    attempt("task-000", Transition(Status.SUCCESS, "sent", None, evolution_key="K0"))
    attempt("task-001", Transition(Status.FAILURE, "permanent", "400 bad number"))
    store.cancel("task-002", now)
    store.expire_due(now + 7200)  # task-003 ... task-007 and task-099 were waiting
    for state in ("server_ack", "delivered", "read"):
        with store.transaction() as cur:
            receipts.apply_in(cur, Receipt("main", "K0", state, now))
    with store.transaction() as cur:
        receipts.accepted_in(cur, "task-001", "main", None, now)  # a made-up ladder for the rest
        receipts.mark_unconfirmed_in(cur, now + 10_000, 600)

    assert _types(store, "task-000") == ["message.sent", "message.delivered", "message.read"]
    assert _types(store, "task-001") == ["message.failed", "message.unconfirmed"]
    assert _types(store, "task-002") == ["message.canceled"]
    assert _types(store, "task-003") == ["message.expired"]
    assert _types(store, "task-099") == []  # no callback target: the triggers write nothing
    webhook_ids = [row.webhook_id for row in ledger.listing(store, limit=100)]
    assert len(set(webhook_ids)) == len(webhook_ids)
    store.close()


def test_recovery_and_the_not_on_whatsapp_memory_are_paths_too(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/cb", SECRET, True, 60, clock.now())
    store.insert_messages([_new(0), _new(1, phone="5511000")])
    now = clock.now()
    assert store.claim("task-000", now, 30) is not None
    store.recover(now, only_expired_leases=False)  # STARTED -> RETRY: message.retrying (on)
    with store.transaction() as cur:
        store.remember_not_on_whatsapp_in(cur, "main", "5511000", now, now + 3600, "no")
    assert store.claim("task-001", now, 30) is not None  # a row, failed at once without a send
    assert _types(store, "task-000") == ["message.retrying"]
    assert _types(store, "task-001") == ["message.failed"]
    store.close()


def test_a_rolled_back_change_leaves_no_callback(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/cb", SECRET, False, 60, clock.now())
    store.insert_messages([_new(0)])
    with pytest.raises(RuntimeError), store.transaction() as cur:
        cur.execute("UPDATE messages SET status = 'CANCELED' WHERE id = 'task-000'")
        raise RuntimeError("the rest of the transaction failed")
    assert _types(store, "task-000") == []
    store.close()


def test_pause_and_resume_reach_the_endpoints_whose_tokens_may_use_the_instance(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    now = clock.now()
    ledger.sync_default(store, "http://127.0.0.1:9/default", SECRET, False, 60, now)
    ledger_tokens.create(store, "shop", ["main"])
    ledger_tokens.create(store, "crm", ["other"])
    for name in ("shop", "crm"):
        ledger.add_endpoint(
            store, ledger.token_endpoint(name), f"http://127.0.0.1:9/{name}", SECRET, now
        )
    store.set_paused("main", True, "maintenance", now)
    store.set_paused("main", True, "again", now)  # already paused: no second event
    store.set_paused("main", False, None, now)
    rows = list(reversed(ledger.listing(store, limit=10)))
    assert [(row.type, row.endpoint) for row in rows] == [
        ("instance.paused", "default"),
        ("instance.paused", "token:shop"),
        ("instance.resumed", "default"),
        ("instance.resumed", "token:shop"),
    ]
    assert (rows[0].data, rows[2].data) == ("maintenance", None)  # the reason, at the time
    store.close()


# -- the sender, driven step by step -------------------------------------------------------------


class Rig:
    """A ledger, its committer and a sender whose clock the test moves (`skip` seconds ahead of
    the wall clock the ledger's triggers stamp rows with)."""

    def __init__(self, data_dir: Path, receiver: Receiver, **settings: Any) -> None:
        self.store = Store(data_dir)
        self.skip = 0.0
        self.settings = Settings(**settings)
        self.committer = GroupCommitter(self.store, asyncio.get_running_loop(), idempotency_ttl=60)
        self.committer.start()
        self.receiver = receiver
        ledger.sync_default(self.store, receiver.url + "/hook", SECRET, False, 60, self.now())

    def now(self) -> float:
        return clock.now() + self.skip

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.sender = CallbackSender(
            self.store,
            self.committer,
            self.settings,
            lambda message_id: {"task_id": message_id},
            self.session,
            now=self.now,
            rng=random.Random(7),
            timeout=120,  # a held request must outlast the test's wait for the others
        )

    async def step(self) -> int:
        """One look at the outbox, the calls it started run to their end; how many there were."""
        tasks = await self.sender.step()
        await asyncio.gather(*tasks)
        return len(tasks)

    async def drain(self, limit: int = 200) -> None:
        """Step (moving the clock to the next due row) until nothing is pending."""
        for _ in range(limit):
            await self.step()
            due = await asyncio.to_thread(ledger.next_due, self.store)
            if due is None:
                return
            self.skip = max(self.skip, due - clock.now())
        raise AssertionError("callbacks still pending")

    def cancel_all(self) -> None:
        now = clock.now()
        for i in range(3):
            self.store.cancel(f"task-{i:03d}", now)

    async def close(self) -> None:
        await self.sender.stop()
        await self.session.close()
        await asyncio.to_thread(self.committer.stop)
        self.store.close()


@pytest.fixture
async def rig(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Rig]:
    made = Rig(tmp_path, receiver)
    await made.start()
    yield made
    await made.close()


async def test_a_callback_is_signed_per_standard_webhooks_and_a_tampered_body_fails(
    rig: Rig, receiver: Receiver
) -> None:
    rig.store.insert_messages([_new(0)])
    rig.store.cancel("task-000", clock.now())
    assert await rig.step() == 1
    (call,) = receiver.received()
    body = call.verified(SECRET)
    assert body["type"] == "message.canceled"
    assert body["data"] == {"task_id": "task-000"}
    assert call.headers["Content-Type"] == "application/json"
    tampered = call.body.replace(b"canceled", b"sent")
    with pytest.raises(WebhookVerificationError):
        Call(call.path, call.headers, tampered).verified(SECRET)
    with pytest.raises(WebhookVerificationError):
        call.verified(OTHER_SECRET)
    (row,) = ledger.listing(rig.store)
    assert (row.state, row.attempts, row.last_status) == ("sent", 1, 200)


async def test_a_receiver_down_for_a_while_gets_everything_in_order_with_one_id_per_event(
    rig: Rig, receiver: Receiver
) -> None:
    rig.store.insert_messages([_new(i) for i in range(3)])
    now = clock.now()
    for i in range(3):
        msg = rig.store.claim(f"task-{i:03d}", now, 30)
        assert msg is not None
        rig.store.finish_attempt(
            msg, now, now, Transition(Status.SUCCESS, "sent", None, evolution_key=f"K{i}")
        )
        for state in ("delivered", "read"):
            with rig.store.transaction() as cur:
                receipts.apply_in(cur, Receipt("main", f"K{i}", state, now))
    receiver.down()
    for _ in range(4):  # four failed rounds, each moved past its backoff
        assert await rig.step() == 3  # one per message: the later events wait for the first
        rig.skip += 3600  # past any backoff (at most an hour)
    assert receiver.received() == []
    (first, *_) = ledger.listing(rig.store, message_id="task-000")[::-1]
    assert (first.state, first.attempts, first.failures) == ("pending", 4, 4)
    receiver.up()
    await rig.drain()
    calls = receiver.received()
    assert len(calls) == 9
    for i in range(3):
        mine = [c.verified(SECRET) for c in calls if f"task-{i:03d}" in c.body.decode()]
        assert [b["type"] for b in mine] == ["message.sent", "message.delivered", "message.read"]
    rows = {row.webhook_id: row for row in ledger.listing(rig.store, limit=20)}
    assert sorted(c.webhook_id for c in calls) == sorted(rows)  # the id survived the retries
    assert {row.state for row in rows.values()} == {"sent"}


async def test_the_retry_schedule_doubles_from_5s_to_an_hour_with_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff(n, rng) for n in range(1, 13)]
    bases = [min(5 * 2 ** (n - 1), 3600) for n in range(1, 13)]
    for delay, base in zip(delays, bases, strict=True):
        assert base <= delay <= min(base * 1.25, 3600)
    assert delays[-1] == 3600
    assert retry_after("120", 0) == 120
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 30) == 30
    assert retry_after("soon", 0) is None


async def test_retry_after_is_respected_on_429(rig: Rig, receiver: Receiver) -> None:
    receiver.status, receiver.answer_headers = 429, {"Retry-After": "120"}
    rig.store.insert_messages([_new(0)])
    rig.store.cancel("task-000", clock.now())
    await rig.step()
    (row,) = ledger.listing(rig.store)
    assert (row.state, row.last_status, row.last_error) == ("pending", 429, "HTTP 429")
    waits = clock.from_db(row.next_attempt_at or "") - clock.from_db(row.last_attempt_at or "")
    assert waits == pytest.approx(120, abs=0.01)


async def test_a_callback_is_given_up_after_the_max_age(tmp_path: Path, receiver: Receiver) -> None:
    made = Rig(tmp_path, receiver, callback_max_age=60)
    await made.start()
    try:
        receiver.status = 500
        made.store.insert_messages([_new(0)])
        made.store.cancel("task-000", clock.now())
        await made.drain()
        (row,) = ledger.listing(made.store)
        assert row.state == "failed"
        assert row.last_error == "HTTP 500; given up after EVOMSGD_CALLBACK_MAX_AGE"
        assert ledger.retry(made.store, [row.id], made.now()) == [row.id]  # an operator's replay
        receiver.status = 204
        await made.drain()
        assert ledger.get(made.store, row.id).state == "sent"  # type: ignore[union-attr]
    finally:
        await made.close()


async def test_410_disables_the_endpoint_until_an_operator_enables_it(
    rig: Rig, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 410
    rig.store.insert_messages([_new(0), _new(1)])
    rig.cancel_all()
    with caplog.at_level(logging.WARNING, "evomsgd.callbacks"):
        await rig.step()
    assert "endpoint 'default' answered 410 Gone; it is disabled" in caplog.text
    (endpoint,) = ledger.endpoints(rig.store, rig.now())
    assert endpoint.disabled_reason == "endpoint 'default' answered 410 Gone"
    rig.skip += 86_400
    assert await rig.step() == 0  # nothing goes to a disabled endpoint
    assert {row.state for row in ledger.listing(rig.store)} == {"pending"}
    receiver.status = 200
    assert ledger.enable(rig.store, "default")
    await rig.drain()
    assert {row.state for row in ledger.listing(rig.store)} == {"sent"}


async def test_a_slow_endpoint_holds_neither_another_endpoint_nor_its_own_later_messages(
    rig: Rig, receiver: Receiver
) -> None:
    other = Receiver()
    try:
        receiver.hold = threading.Event()  # the default endpoint hangs
        ledger.add_endpoint(rig.store, "token:crm", other.url + "/crm", OTHER_SECRET, rig.now())
        rig.store.insert_messages(
            [_new(i) for i in range(6)] + [_new(i, callback_to="token:crm") for i in range(10, 13)]
        )
        for i in [*range(6), *range(10, 13)]:
            rig.store.cancel(f"task-{i:03d}", clock.now())
        tasks = await rig.sender.step()
        assert len(tasks) == 4 + 3  # PER_ENDPOINT for the slow one, all of the other's
        await asyncio.to_thread(other.wait_for, lambda calls: len(calls) == 3)

        def sent() -> set[str | None]:
            return {r.endpoint for r in ledger.listing(rig.store, limit=20) if r.state == "sent"}

        await until(lambda: len(ledger.listing(rig.store, state="sent")) == 3)
        assert sent() == {"token:crm"}  # delivered while the slow endpoint still holds its calls
        assert sum(not task.done() for task in tasks) == 4
        receiver.hold.set()
        await asyncio.gather(*tasks)
        await rig.drain()
        assert len(receiver.received()) == 6
        assert [c.verified(OTHER_SECRET)["type"] for c in other.received()] == [
            "message.canceled"
        ] * 3
    finally:
        other.close()


async def test_during_a_rotation_both_secrets_verify(rig: Rig, receiver: Receiver) -> None:
    ledger.sync_default(rig.store, receiver.url + "/hook", OTHER_SECRET, False, 3600, rig.now())
    rig.store.insert_messages([_new(0), _new(1)])
    rig.store.cancel("task-000", clock.now())
    await rig.step()
    rig.skip += 7200  # the overlap is over: only the new secret signs
    rig.store.cancel("task-001", clock.now())
    await rig.step()
    during, after = receiver.received()
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert during.verified(SECRET)["data"]["task_id"] == "task-000"
    assert during.verified(OTHER_SECRET)["data"]["task_id"] == "task-000"
    assert after.verified(OTHER_SECRET)["data"]["task_id"] == "task-001"
    with pytest.raises(WebhookVerificationError):
        after.verified(SECRET)


# -- through the daemon's API --------------------------------------------------------------------


async def _app(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver, **settings: Any
) -> TestClient[Any, Any]:
    return await make_client(
        fast_settings(
            evolution_url=fake.url,
            callback_url=receiver.url + "/hook",
            callback_secret=SECRET,
            **settings,
        )
    )


async def test_a_sent_message_is_called_back_with_the_task_as_get_shows_it(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    client = await _app(make_client, fake, receiver)
    task = await post(client, message="Your code is 987654")
    shown = await wait_status(client, task["task_id"])
    (call,) = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
    body = call.verified(SECRET)
    assert body["type"] == "message.sent"
    assert body["data"]["task_id"] == task["task_id"]
    assert body["data"]["status"] == "SUCCESS"
    assert body["data"]["result"] == shown["result"]
    assert "987654" not in call.body.decode()  # the text only with EVOMSGD_CALLBACK_INCLUDE_TEXT


async def test_the_text_is_sent_only_when_asked(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    client = await _app(make_client, fake, receiver, callback_include_text=True)
    await post(client, message="Your code is 987654")
    (call,) = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
    assert call.verified(SECRET)["data"]["message"] == "Your code is 987654"


async def test_a_callback_url_outside_the_allowed_prefixes_is_422(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    client = await _app(make_client, fake, receiver, callback_allowed=(receiver.url + "/app/",))
    resp = await client.post(
        "/messages",
        json={"phone": "+5511988887777", "message": "hi", "callback_url": "http://10.0.0.1/x"},
    )
    assert resp.status == 422
    assert await resp.json() == {
        "success": False,
        "error": {
            "code": "validation_error",
            "message": "callback_url: 'http://10.0.0.1/x' is not allowed: it matches no prefix "
            "in EVOMSGD_CALLBACK_ALLOWED",
            "details": [
                {
                    "field": "callback_url",
                    "message": "'http://10.0.0.1/x' is not allowed: it matches no prefix in "
                    "EVOMSGD_CALLBACK_ALLOWED",
                }
            ],
        },
    }
    task = await post(client, callback_url=receiver.url + "/app/orders")
    calls = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
    assert calls[0].path == "/app/orders"
    assert calls[0].verified(SECRET)["data"]["task_id"] == task["task_id"]


async def test_each_token_hears_only_of_its_own_messages(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    crm = Receiver()
    try:
        client = await make_client(fast_settings(evolution_url=fake.url))
        store = client.app[SERVICE].store
        shop_token = ledger_tokens.create(store, "shop")
        crm_token = ledger_tokens.create(store, "crm")
        ledger.add_endpoint(store, "token:shop", receiver.url + "/shop", SECRET, clock.now())
        ledger.add_endpoint(store, "token:crm", crm.url + "/crm", OTHER_SECRET, clock.now())
        client.app[guards.TOKENS]._read_at = float("-inf")  # re-read now: tokens exist
        ids = {}
        for name, token in (("shop", shop_token), ("crm", crm_token)):
            resp = await client.post(
                "/messages",
                json={"phone": "+5511988887777", "message": f"for {name}"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert resp.status == 202
            ids[name] = (await resp.json())["task_id"]
        shop = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
        theirs = await asyncio.to_thread(crm.wait_for, lambda calls: len(calls) == 1)
        assert shop[0].verified(SECRET)["data"]["task_id"] == ids["shop"]
        assert theirs[0].verified(OTHER_SECRET)["data"]["task_id"] == ids["crm"]
        # The outbox's routes show a token its own callbacks only.
        as_shop = {"Authorization": f"Bearer {shop_token}"}
        mine = (await (await client.get("/callbacks", headers=as_shop)).json())["callbacks"]
        assert [(row["task_id"], row["endpoint"]) for row in mine] == [(ids["shop"], "token:shop")]
        crm_row = ledger.listing(store, message_id=ids["crm"])[0]
        hidden = await client.get(f"/callbacks/{crm_row.id}", headers=as_shop)
        assert hidden.status == 404
        endpoints = await (await client.get("/callbacks/endpoints", headers=as_shop)).json()
        assert [e["name"] for e in endpoints["endpoints"]] == ["token:shop"]
    finally:
        crm.close()


async def test_the_callback_secret_is_never_logged_nor_shown(
    make_client: MakeClient,
    fake: FakeEvolution,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.status = 500
    with caplog.at_level(logging.DEBUG):
        client = await _app(make_client, fake, receiver)
        await post(client)
        await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
        store = client.app[SERVICE].store
        await until(lambda: ledger.listing(store)[0].attempts == 1)
    bare = SECRET.removeprefix("whsec_")
    assert bare not in caplog.text
    assert "callback 1 (message.sent) to default: HTTP 500; retrying in" in caplog.text


async def test_the_outbox_is_visible_and_replayable_through_the_api(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    receiver.status = 410
    client = await _app(make_client, fake, receiver)
    task = await post(client)
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)

    async def endpoint() -> dict[str, Any]:
        body = await (await client.get("/callbacks/endpoints")).json()
        (only,) = body["endpoints"]
        return dict(only)

    store = client.app[SERVICE].store
    await until(lambda: ledger.endpoints(store, clock.now())[0].disabled_at is not None)
    health = await endpoint()
    assert health["disabled_reason"] == "endpoint 'default' answered 410 Gone"
    assert (health["pending"], health["rotating"], health["url"]) == (
        1,
        False,
        receiver.url + "/hook",
    )
    assert "secret" not in json.dumps(health)
    listing = await (await client.get("/callbacks?state=pending&since=1h")).json()
    (row,) = listing["callbacks"]
    assert (row["type"], row["task_id"], row["last_status"]) == (
        "message.sent",
        task["task_id"],
        410,
    )
    assert await (await client.get(f"/callbacks/{row['id']}")).json() == row
    assert (await client.get("/callbacks?state=lost")).status == 422
    missing = await client.get("/callbacks/999")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"

    receiver.status = 200
    enabled = await client.post("/callbacks/endpoints/default/enable", headers=JSON)
    assert enabled.status == 200 and (await enabled.json())["disabled_at"] is None
    calls = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 2)
    assert calls[0].webhook_id == calls[1].webhook_id  # the same event, once more
    await until(lambda: ledger.listing(store)[0].state == "sent")
    replay = await client.post(f"/callbacks/{row['id']}/retry", headers=JSON)
    assert (replay.status, await replay.json()) == (202, {"retried": [row["id"]]})
    calls = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 3)
    assert calls[2].webhook_id == row["webhook_id"]
    await until(lambda: ledger.listing(store)[0].state == "sent")
    bulk = await client.post("/callbacks/retry?state=sent", headers=JSON)
    assert (bulk.status, await bulk.json()) == (202, {"retried": [row["id"]]})
    none_failed = await client.post("/callbacks/retry", headers=JSON)
    assert await none_failed.json() == {"retried": []}


# -- the relay -----------------------------------------------------------------------------------


async def test_the_relay_forwards_evolutions_body_byte_for_byte_and_then_erases_it(
    make_client: MakeClient,
    fake: FakeEvolution,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chatbot = Receiver()
    try:
        client = await make_client(
            fast_settings(
                evolution_url=fake.url,
                relay_url=receiver.url + "/all",
                instances={"other": LaneSettings(relay_url=chatbot.url + "/bot")},
            )
        )
        store = client.app[SERVICE].store
        secret = await asyncio.to_thread(make_secret, store)
        token = "B6D711FCDE4D4FD5936544120E713976"  # an instance token, as Evolution sends it
        raw = (
            '{"event":"messages.upsert", "instance":"main",\n  "data":{"text":"olá 👋"},'
            f' "apikey":"{token}"}}'
        ).encode()
        other = b'{"event": "connection.update", "instance": "other", "data": {"state": "open"}}'
        with caplog.at_level(logging.DEBUG):
            for body, path in ((raw, ""), (other, "/connection-update")):
                resp = await client.post(
                    "/webhooks/evolution" + path,
                    data=body,
                    headers={**JSON, SECRET_HEADER: secret},
                )
                assert resp.status == 200, await resp.text()
            (forwarded,) = await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
            (bot,) = await asyncio.to_thread(chatbot.wait_for, lambda calls: len(calls) == 1)
        assert forwarded.body == raw and forwarded.path == "/all"
        assert bot.body == other and bot.path == "/bot/connection-update"
        assert "webhook-signature" not in forwarded.headers  # unchanged: Evolution signs nothing
        assert token not in caplog.text

        def erased() -> bool:
            rows = ledger.listing(store, limit=10)
            return len(rows) == 2 and all(r.state == "sent" and r.body is None for r in rows)

        await until(erased)  # the outcome is written just after the receiver answered
        with store.transaction() as cur:
            leftover = cur.execute(
                "SELECT count(*) FROM callbacks WHERE body LIKE ?", (f"%{token}%",)
            )
            assert leftover.fetchone()[0] == 0
        replay = await client.post("/callbacks/1/retry", headers=JSON)
        assert replay.status == 409
    finally:
        chatbot.close()


def test_retention_purges_delivered_callbacks_with_their_messages_not_owed_ones(
    tmp_path: Path,
) -> None:
    from evomsgd.ledger.records import CallbackOutcome, Retention
    from evomsgd.ledger.retention import purge

    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/cb", SECRET, False, 60, clock.now())
    store.insert_messages([_new(0), _new(1)])
    store.cancel("task-000", clock.now())
    store.cancel("task-001", clock.now())
    store.set_paused("main", True, "x", clock.now())
    with store.transaction() as cur:
        for callback_id in (1, 3):  # task-000's and the pause's were delivered
            ledger.record_in(
                cur, CallbackOutcome(callback_id, clock.now(), b"{}", "sent", None, 200, None)
            )
    purge(store, clock.now() + 10 * 86_400, Retention(success_days=1, failed_days=1))
    assert [(row.type, row.message_id) for row in ledger.listing(store)] == [
        ("message.canceled", "task-001")  # still owed: kept and sent, its message gone or not
    ]
    store.close()


async def test_metrics_count_the_outbox(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    receiver.status = 503
    client = await _app(make_client, fake, receiver)
    await post(client)
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)
    text = await (await client.get("/metrics")).text()
    assert 'evomsgd_callbacks{state="pending"} 1.0' in text
    assert 'evomsgd_callbacks{state="sent"} 0.0' in text
    assert "evomsgd_callbacks_oldest_pending_seconds " in text
    assert 'evomsgd_callback_endpoint_disabled{endpoint="default"} 0.0' in text


async def test_an_instance_event_carries_the_pause_and_its_reason(
    rig: Rig, receiver: Receiver
) -> None:
    rig.store.set_paused("main", True, "number banned?", clock.now())
    rig.store.set_paused("main", False, None, clock.now())
    await rig.drain()
    paused, resumed = (call.verified(SECRET) for call in receiver.received())
    assert paused["type"] == "instance.paused"
    assert paused["data"] == {"instance": "main", "paused": True, "reason": "number banned?"}
    assert resumed["data"] == {"instance": "main", "paused": False, "reason": None}


async def test_410_from_a_messages_own_url_fails_that_callback_only(
    rig: Rig, receiver: Receiver
) -> None:
    receiver.status = 410
    rig.store.insert_messages([_new(0, callback_url=receiver.url + "/own"), _new(1)])
    rig.store.cancel("task-000", clock.now())
    await rig.step()
    (row,) = ledger.listing(rig.store)
    assert (row.state, row.last_error) == ("failed", "410 Gone")
    (endpoint,) = ledger.endpoints(rig.store, rig.now())
    assert endpoint.disabled_at is None
    assert receiver.received()[0].path == "/own"


def test_a_revoked_tokens_endpoint_goes_with_it(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ledger_tokens.create_with_callback(store, "billing", [], "https://b.example/cb")
    assert [row.callback for row in store.tokens()] == [True]
    ledger_tokens.revoke(store, "billing")
    ledger_tokens.create(store, "billing")
    assert [row.callback for row in store.tokens()] == [False]  # nothing inherited
    assert ledger.endpoints(store, clock.now()) == []
    store.close()


def test_a_retry_asked_during_an_attempt_is_not_undone_by_its_outcome(tmp_path: Path) -> None:
    from evomsgd.ledger.records import CallbackOutcome

    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/cb", SECRET, False, 60, clock.now())
    store.insert_messages([_new(0)])
    store.cancel("task-000", clock.now())
    started = clock.now()
    ledger.retry(store, [1], started + 1)  # the operator's retry lands while the call is out
    with store.transaction() as cur:
        ledger.record_in(cur, CallbackOutcome(1, started, b"{}", "sent", None, 200, None))
    row = ledger.get(store, 1)
    assert row is not None and (row.state, row.attempts) == ("pending", 1)
    store.close()


async def test_a_hung_receiver_never_slows_sending(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    receiver.hold = threading.Event()  # every callback call hangs
    client = await _app(make_client, fake, receiver)
    ids = [(await post(client, phone=f"+55119888777{i:02d}"))["task_id"] for i in range(8)]
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) >= 1)
    for task_id in ids:  # every message is sent while its callbacks wait on the receiver
        assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert len(receiver.received()) <= 4  # at most PER_ENDPOINT calls held by a dead endpoint
    receiver.hold.set()
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) >= 8)


async def test_an_instance_that_disconnects_and_comes_back_is_called_back_once_each(
    make_client: MakeClient, fake: FakeEvolution, receiver: Receiver
) -> None:
    """Health pauses (WhatsApp disconnected, Evolution down) are decided by the dispatcher in
    memory, not by an operator: they reach the apps too, one paused and one resumed."""
    fake.set_state("main", "close")
    client = await _app(make_client, fake, receiver)
    task = await post(client)

    def types(calls: list[Call]) -> list[str]:
        return [call.verified(SECRET)["type"] for call in calls]

    calls = await asyncio.to_thread(
        receiver.wait_for, lambda calls: "instance.paused" in types(calls)
    )
    paused = calls[0].verified(SECRET)
    assert paused["data"]["instance"] == "main" and paused["data"]["paused"] is True
    assert paused["data"]["reason"].startswith("close: ")
    fake.set_state("main", "open")
    assert (await wait_status(client, task["task_id"]))["status"] == "SUCCESS"
    calls = await asyncio.to_thread(
        receiver.wait_for,
        lambda calls: "message.sent" in types(calls) and "instance.resumed" in types(calls),
    )
    events = [t for t in types(calls) if t.startswith("instance.")]
    assert events == ["instance.paused", "instance.resumed"]
    resumed = next(c.verified(SECRET) for c in calls if "resumed" in c.verified(SECRET)["type"])
    assert resumed["data"] == {"instance": "main", "paused": False, "reason": "open"}
