"""Callbacks end to end: a real daemon killed with SIGKILL at random moments loses no callback."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import FakeProcess, free_port, wait_until
from tests.receiver import Receiver
from tests.test_callbacks import SECRET
from tests.test_e2e import Daemon, Stream, evolution_env, ledger_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_proc() -> FakeProcess:
    fake = FakeProcess("--instances", "main", "--latency", "0.005")
    yield fake  # type: ignore[misc]
    fake.stop()


def _outbox(data_dir: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(data_dir / "evomsgd.db")) as conn:
        return list(conn.execute("SELECT message_id, type, state FROM callbacks"))


def test_kill_9_at_random_moments_loses_no_callback(tmp_path: Path, fake_proc: FakeProcess) -> None:
    receiver = Receiver()
    data_dir = tmp_path / "data"
    port = free_port()
    env = {
        **evolution_env(fake_proc),
        "EVOMSGD_CALLBACK_URL": receiver.url + "/hook",
        "EVOMSGD_CALLBACK_SECRET": SECRET,
    }
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    print(f"kill points seed {seed}")
    accepted: dict[str, int] = {}
    next_index = 0
    try:
        for _round in range(3):
            daemon = Daemon(data_dir, port, **env)
            stream = Stream(daemon.url, next_index)
            target = rng.randrange(50, 300)
            wait_until(lambda s=stream, n=target: len(s.accepted) >= n, 60, f"{target} accepted")
            # A random moment while callbacks are in flight too: after 0 to 30 more of them.
            seen = len(receiver.received())
            more = rng.randrange(0, 30)
            wait_until(lambda s=seen, m=more: len(receiver.received()) >= s + m, 60, "callbacks")
            daemon.proc.kill()
            daemon.proc.wait(10)
            daemon.log.close()
            stream.stop()
            accepted.update(stream.accepted)
            next_index = stream.next + 1
        daemon = Daemon(data_dir, port, **env)
        try:

            def all_sent() -> bool:
                rows = ledger_rows(data_dir)
                if not all(rows.get(t, {}).get("status") == "SUCCESS" for t in accepted):
                    return False
                return all(state == "sent" for _, _, state in _outbox(data_dir))

            wait_until(all_sent, 180, "every task sent and every callback delivered")
        finally:
            assert daemon.stop() == 0
        ids: dict[tuple[str, str], set[str]] = defaultdict(set)
        for call in receiver.received():
            body = call.verified(SECRET)
            ids[(body["data"]["task_id"], body["type"])].add(call.webhook_id)
        for task_id in accepted:
            assert (task_id, "message.sent") in ids, task_id  # every event arrived
        # A callback sent twice (a kill between its answer and its record) kept its webhook-id.
        assert all(len(webhook_ids) == 1 for webhook_ids in ids.values())
        assert len(accepted) >= 150
    finally:
        receiver.close()
