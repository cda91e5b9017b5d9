"""`evomsgd webhook setup` and doctor's receipts lines, in-process with CliRunner and exact output
against the fake Evolution (a real HTTP server on a loop thread)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evomsgd.engine.receipts import SECRET_HEADER, digest
from evomsgd.ledger import receipts as ledger
from evomsgd.ledger.store import Store
from tests.conftest import API_KEY
from tests.fake_evolution import FakeEvolution
from tests.test_cli import LoopThread, invoke, loop_thread

__all__ = ["loop_thread"]  # a fixture, used by name

PUBLIC = "http://127.0.0.1:8001"
OURS = PUBLIC + "/webhooks/evolution"
EVENTS = ["SEND_MESSAGE", "MESSAGES_UPDATE", "CONNECTION_UPDATE"]


@pytest.fixture
def fake(loop_thread: LoopThread) -> Iterator[FakeEvolution]:
    server = FakeEvolution(api_key=API_KEY, instances=["main", "other"])
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.close())


def setup(fake: FakeEvolution, data_dir: Path, *args: str, **env: str):  # type: ignore[no-untyped-def]
    env = {"EVOLUTION_API_URL": fake.url, "EVOLUTION_API_KEY": API_KEY, **env}
    return invoke("webhook", "setup", "--data-dir", str(data_dir), *args, **env)


def stored_digest(data_dir: Path) -> str | None:
    store = Store(data_dir)
    try:
        return ledger.secret_digest(store)
    finally:
        store.close()


def test_setup_configures_each_instance_and_never_prints_the_secret(
    fake: FakeEvolution, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = setup(
        fake, data, "--instance", "main", "--instance", "other", EVOMSGD_PUBLIC_URL=PUBLIC
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"instance main: receipts configured ({OURS})\n"
        f"instance other: receipts configured ({OURS})\n"
    )
    assert result.stderr == ""
    secret = fake.webhooks["main"]["headers"][SECRET_HEADER]
    assert secret not in result.output
    assert stored_digest(data) == digest(secret)
    for name in ("main", "other"):
        hook = fake.webhooks[name]
        assert (hook["url"], hook["events"], hook["enabled"]) == (OURS, EVENTS, True)
        assert hook["headers"] == {SECRET_HEADER: secret}
    # Again, for one of them: the secret the others present is reused, not replaced.
    again = setup(fake, data, "--instance", "other", "--url", PUBLIC + "/")
    assert again.exit_code == 0, again.output
    assert again.stdout == f"instance other: receipts configured ({OURS})\n"
    assert fake.webhooks["other"]["headers"] == {SECRET_HEADER: secret}
    assert stored_digest(data) == digest(secret)


def test_setup_refuses_another_apps_url_unless_replace(fake: FakeEvolution, tmp_path: Path) -> None:
    data = tmp_path / "data"
    fake.webhooks["other"] = {
        "url": "https://crm.example/hook",
        "headers": {},
        "enabled": True,
        "events": [],
        "webhookByEvents": False,
    }
    args = ("--instance", "main", "--instance", "other", "--url", PUBLIC)
    refused = setup(fake, data, *args)
    assert refused.exit_code == 1
    assert refused.stdout == ""
    assert refused.stderr == (
        "instance other: Evolution already sends its webhooks to https://crm.example/hook (one "
        "webhook per instance) - not changed; pass --replace to point it at "
        f'{OURS}, or keep that app listening: set relay_url = "https://crm.example/hook" in '
        "[instances.other] (or EVOMSGD_RELAY_URL) and evomsgd forwards every webhook to it\n"
    )
    assert "main" not in fake.webhooks  # nothing changed, not even the instance that was free
    assert stored_digest(data) is None
    replaced = setup(fake, data, *args, "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert fake.webhooks["other"]["url"] == OURS


def test_setup_takes_over_a_webhook_it_relays(fake: FakeEvolution, tmp_path: Path) -> None:
    data = tmp_path / "data"
    fake.webhooks["other"] = {
        "url": "https://crm.example/hook",
        "headers": {},
        "enabled": True,
        "events": [],
        "webhookByEvents": False,
    }
    config = tmp_path / "evomsgd.toml"
    config.write_text('[instances.other]\nrelay_url = "https://crm.example/hook"\n')
    done = setup(fake, data, "--instance", "other", "--url", PUBLIC, EVOMSGD_CONFIG=str(config))
    assert done.exit_code == 0, done.output
    assert done.stdout == (
        f"instance other: receipts configured ({OURS}); its webhooks are relayed to "
        "https://crm.example/hook\n"
    )
    assert fake.webhooks["other"]["url"] == OURS


def test_setup_errors(fake: FakeEvolution, tmp_path: Path) -> None:
    data = tmp_path / "data"
    no_url = setup(fake, data, "--instance", "main")
    assert no_url.exit_code != 0
    assert no_url.stderr == (
        "error: no URL for Evolution to reach evomsgd - pass --url or set EVOMSGD_PUBLIC_URL "
        "(e.g. http://127.0.0.1:8001)\n"
    )
    missing = setup(fake, data, "--instance", "gone", "--url", PUBLIC)
    assert missing.exit_code == 1
    assert missing.stderr == (
        "instance gone: Evolution has no such instance (404) - check the instance name\n"
    )
    assert "gone" not in fake.webhooks


def test_doctor_says_whether_receipts_are_configured_and_the_last_one(
    fake: FakeEvolution, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    fake.add_instance("evo", integration="EVOLUTION")
    fake.add_instance("crm")
    assert setup(fake, data, "--instance", "main", "--url", PUBLIC).exit_code == 0
    fake.webhooks["crm"] = {"url": "https://crm.example/hook", "headers": {}, "enabled": True}
    store = Store(data)
    try:
        with store.transaction() as cur:
            ledger.heard_in(cur, "main", 1_796_156_906.0)
            cur.execute("INSERT INTO lanes (instance, integration) VALUES ('evo', 'EVOLUTION')")
            cur.execute("INSERT INTO lanes (instance) VALUES ('crm'), ('other')")
    finally:
        store.close()
    data.chmod(0o700)
    env = {"EVOLUTION_API_URL": fake.url, "EVOLUTION_API_KEY": API_KEY}
    result = invoke("doctor", "--data-dir", str(data), **env)
    receipts = [line.rstrip() for line in result.stdout.splitlines() if "receipts" in line]
    assert receipts == [
        "WARN  receipts crm     Evolution sends them to https://crm.example/hook, without "
        "evomsgd's secret - run `evomsgd webhook setup --instance crm` (--replace if another "
        "app uses that URL)",
        "OK    receipts evo     no receipts on this instance (its integration EVOLUTION emits none)",
        f"OK    receipts main    configured ({OURS}); last receipt 2026-12-01T20:28:26.000Z",
        "WARN  receipts other   not configured: no delivery receipts - run "
        "`evomsgd webhook setup --instance other`",
    ]
    secret = fake.webhooks["main"]["headers"][SECRET_HEADER]
    assert secret not in result.output
