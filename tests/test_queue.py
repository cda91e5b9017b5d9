"""The embedded Huey pieces: workers wake on enqueue instead of polling, and never own signals."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from evomsgd.engine import workers as queue_module
from evomsgd.engine.jobs import Job
from evomsgd.engine.workers import TaskQueue


def test_an_idle_worker_wakes_on_enqueue_not_on_a_poll(tmp_path: Path, monkeypatch: object) -> None:
    # With a 60 s idle wait, only the enqueue's wake-up can deliver the task before the deadline.
    monkeypatch.setattr(queue_module, "_IDLE_WAIT", 60.0)  # type: ignore[attr-defined]
    ran = threading.Event()
    tq = TaskQueue(tmp_path, workers=1)
    tq.register(lambda jobs: ran.set())
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    tq.start()
    try:
        # Let the worker reach its wait: its first dequeue finds nothing and sleeps on the condition.
        deadline = time.monotonic() + 5
        while tq.storage._generation == 0 and time.monotonic() < deadline:
            with tq.storage._cond:
                if tq.storage._cond._waiters:  # type: ignore[attr-defined]
                    break
            time.sleep(0.001)
        tq.submit([Job("m1", "shop")])
        assert ran.wait(5), "the worker did not wake up on enqueue"
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # aiohttp keeps signals
    finally:
        tq.stop()
    assert tq.alive_workers() == 0


def test_the_hand_off_starts_empty_and_an_old_queue_file_is_removed(tmp_path: Path) -> None:
    old = tmp_path / "queue.db"  # Huey's SQLite queue of an older evomsgd
    old.write_bytes(b"SQLite format 3\x00")
    (tmp_path / "queue.db-wal").write_bytes(b"")
    first = TaskQueue(tmp_path, workers=1)
    assert not old.exists() and not (tmp_path / "queue.db-wal").exists()
    first.register(lambda jobs: None)
    first.submit([Job("stale", "shop")])  # never consumed: no consumer started
    assert first.huey.pending_count() == 1
    second = TaskQueue(tmp_path, workers=1)
    assert second.huey.pending_count() == 0  # the ledger, not Huey, says what is waiting
    assert list(tmp_path.iterdir()) == []  # nothing of Huey's on disk
