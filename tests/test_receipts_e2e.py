"""kill -9 right after a receipt's 200 loses nothing: a real `evomsgd serve` process."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from evomsgd.engine.receipts import SECRET_HEADER, make_secret
from evomsgd.ledger.store import Store
from tests.conftest import FakeProcess, free_port, wait_until
from tests.test_e2e import Daemon, evolution_env, request

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_proc() -> Iterator[FakeProcess]:
    fake = FakeProcess("--instances", "main")
    yield fake
    fake.stop()


def _hook(url: str, secret: str, key: str, status: str) -> int:
    body = {
        "event": "messages.update",
        "instance": "main",
        "data": {"keyId": key, "fromMe": True, "status": status},
        "apikey": "instance-token",
    }
    req = urllib.request.Request(
        url + "/webhooks/evolution",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", SECRET_HEADER: secret},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_kill_9_after_a_receipts_200_loses_nothing(tmp_path: Path, fake_proc: FakeProcess) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = Store(data_dir)
    secret = make_secret(store)
    store.close()
    env = evolution_env(fake_proc)
    daemon = Daemon(data_dir, free_port(), **env)
    status, accepted = request(
        daemon.url + "/messages", {"phone": "+5511988887777", "message": "Your code is 1"}
    )
    assert status == 202
    task = accepted["task_id"]
    sent = wait_until(
        lambda: (lambda b: b if b["status"] == "SUCCESS" else None)(
            request(f"{daemon.url}/tasks/{task}")[1]
        ),
        what="SUCCESS",
    )
    key = sent["result"]["evolution_key"]
    assert _hook(daemon.url, secret, key, "DELIVERY_ACK") == 200
    assert _hook(daemon.url, secret, key, "READ") == 200
    daemon.stop(signal.SIGKILL)
    again = Daemon(data_dir, free_port(), **env)
    try:
        body = request(f"{again.url}/tasks/{task}")[1]
        assert body["delivery"]["state"] == "read"
        assert body["delivery"]["delivered_at"] <= body["delivery"]["read_at"]
    finally:
        again.stop()
