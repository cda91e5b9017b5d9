"""Remember who is not on WhatsApp: a number WhatsApp said it does not know fails at once for
EVOMSGD_NOT_ON_WHATSAPP_TTL, without asking WhatsApp again; `evomsgd contacts forget` clears it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome, classify_response
from evomsgd.ledger.deliveries import REMEMBERED
from evomsgd.ledger.store import Store
from evomsgd.models import Status
from tests.conftest import JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution
from tests.stepper import SENT, T0, Stepper
from tests.test_cli import invoke

GHOST = "5511900000009"
NOT_ON_WHATSAPP = SendOutcome(
    OutcomeKind.PERMANENT,
    f"{GHOST} is not on WhatsApp (400)",
    400,
    detail=f"not on WhatsApp: {GHOST}",
    not_on_whatsapp=(GHOST,),
)


def test_the_answer_names_the_numbers_to_remember() -> None:
    body = b'{"status":400,"error":"Bad Request","response":{"message":[{"jid":"5511900000009@s.whatsapp.net","exists":false,"number":"5511900000009"}]}}'
    assert classify_response(400, body).not_on_whatsapp == (GHOST,)
    blank = b'{"status":400,"error":"Bad Request","response":{"message":["Text is required"]}}'
    assert classify_response(400, blank).not_on_whatsapp == ()


def test_a_remembered_number_fails_at_once_until_the_memory_expires(tmp_path: Path) -> None:
    s = Stepper(tmp_path, not_on_whatsapp_ttl=3600.0)
    s.accept(GHOST)
    s.step()
    (job,) = s.take()
    assert s.attempt(job, NOT_ON_WHATSAPP).status == Status.FAILURE
    again = s.accept(GHOST)
    other = s.accept(GHOST, instance="other")  # remembered per instance
    s.now += 60.0
    s.step()
    assert [j.message_id for j in s.take()] == [other]  # not handed out: nothing to ask
    row = s.store.get(again)
    assert row is not None and (row.status, row.error_kind) == (Status.FAILURE, REMEMBERED)
    assert row.attempts == 0
    assert row.last_error is not None
    assert row.last_error.startswith(f"{GHOST} is not on WhatsApp (400)")
    assert "remembered since 2027-01-15T08:00:00.000Z" in row.last_error
    assert "evomsgd contacts forget" in row.last_error
    s.now = T0 + 3601.0  # the memory has expired: WhatsApp is asked again
    later = s.accept(GHOST)
    s.step()
    (job,) = [j for j in s.take() if j.message_id == later]
    assert s.attempt(job, SENT).status == Status.SUCCESS
    s.close()


def test_the_memory_can_be_turned_off(tmp_path: Path) -> None:
    s = Stepper(tmp_path, not_on_whatsapp_ttl=0)
    s.accept(GHOST)
    s.step()
    (job,) = s.take()
    s.attempt(job, NOT_ON_WHATSAPP)
    again = s.accept(GHOST)
    s.step()
    assert [j.message_id for j in s.take()] == [again]
    s.close()


async def test_whatsapp_is_asked_once_then_the_memory_answers(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    fake.not_on_whatsapp.add(GHOST)
    client: TestClient[Any, Any] = await make_client(fast_settings(evolution_url=fake.url))
    first = await wait_status(client, (await post(client, phone=f"+{GHOST}"))["task_id"])
    assert first["status"] == "FAILURE" and first["result"]["error_kind"] == "permanent"
    second = await wait_status(client, (await post(client, phone=f"+{GHOST}"))["task_id"])
    assert second["status"] == "FAILURE"
    assert second["result"]["error_kind"] == REMEMBERED
    assert "remembered since" in second["result"]["error"]
    assert second["attempts"] == 0
    assert len(fake.received) == 1  # WhatsApp was asked about the number once
    # An operator's retry asks again (and forgets the memory): the number may have joined.
    fake.not_on_whatsapp.discard(GHOST)
    retried = await client.post(f"/tasks/{second['task_id']}/retry", headers=JSON)
    assert retried.status == 202
    assert (await wait_status(client, second["task_id"]))["status"] == "SUCCESS"
    assert len(fake.received) == 2


def test_contacts_forget_clears_the_memory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.transaction() as cur:
        store.remember_not_on_whatsapp_in(cur, "shop", GHOST, T0, T0 + 60, "not on WhatsApp")
        store.remember_not_on_whatsapp_in(cur, "clinic", GHOST, T0, T0 + 60, "not on WhatsApp")
    store.close()
    env = {"EVOMSGD_DATA_DIR": str(tmp_path)}
    result = invoke("contacts", "forget", f"+{GHOST}", "--instance", "shop", **env)
    assert (result.exit_code, result.output) == (
        0,
        f"forgot {GHOST} for shop: the next message to it is sent\n",
    )
    result = invoke("contacts", "forget", f"+{GHOST}", **env)
    assert result.output == f"forgot {GHOST} for clinic: the next message to it is sent\n"
    result = invoke("contacts", "forget", f"+{GHOST}", **env)
    assert result.output == f"nothing remembered of {GHOST}\n"
    result = invoke("contacts", "forget", "not a phone", **env)
    assert result.exit_code == 1 and "phone 'not a phone'" in result.output
