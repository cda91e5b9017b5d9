"""Huey, embedded: the worker threads that run deliveries, woken at once instead of polling.

Huey's queue here is a hand-off, not the record: the ledger (`store.py`) is. Huey's SQLite storage
deletes a task row before running it and keeps retries in a schedule table that a crash can lose,
so retries and pacing live in the ledger, and Huey's queue file is emptied at every start and
rebuilt from the ledger. That also lets it skip fsync: losing it loses nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import SqliteHuey
from huey.consumer import Consumer
from huey.storage import SqliteStorage

from evomsgd.engine.jobs import Job

log = logging.getLogger("evomsgd.queue")

QUEUE_FILE = "queue.db"
TASK_NAME = "evomsgd.deliver"  # explicit: a dev run and the frozen binary must agree on names
_IDLE_WAIT = 1.0


class WakeableSqliteStorage(SqliteStorage):  # type: ignore[misc]
    """SqliteStorage whose dequeue waits on a condition instead of Huey's 0.1-10 s polling."""

    blocking = True  # tells Huey's Worker not to sleep between empty dequeues: we wait here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False
        super().__init__(*args, **kwargs)

    def enqueue(self, data: bytes, priority: float | None = None) -> None:
        super().enqueue(data, priority)
        self.wake()

    def wake(self) -> None:
        """Wake every idle worker (new work, or shutting down)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def shut(self) -> None:
        """Make idle workers return at once so Huey can see its stop flag."""
        self._closed = True
        self.wake()

    def dequeue(self) -> bytes | None:
        with self._cond:
            seen = self._generation
        data: bytes | None = super().dequeue()
        if data is not None or self._closed:
            return data
        with self._cond:
            # An enqueue between our empty read and now bumped the generation: do not sleep.
            if self._generation == seen:
                self._cond.wait(_IDLE_WAIT)
        return None


class EmbeddedConsumer(Consumer):  # type: ignore[misc]
    """Huey's consumer without its signal handlers: aiohttp's runner owns SIGTERM/SIGINT."""

    def _set_signal_handlers(self) -> None:
        pass

    def alive_workers(self) -> int:
        """Worker threads that are running."""
        return sum(1 for _, thread in self.worker_threads if thread.is_alive())


class TaskQueue:
    """The Huey instance, its delivery task and its consumer, built for one data directory."""

    def __init__(self, data_dir: Path, workers: int) -> None:
        path = data_dir / QUEUE_FILE
        for stale in (
            path,
            path.with_name(QUEUE_FILE + "-wal"),
            path.with_name(QUEUE_FILE + "-shm"),
        ):
            # Rebuilt from the ledger at every start (see module docstring).
            if stale.exists():
                stale.unlink()
        self.huey = SqliteHuey(
            name="evomsgd",
            filename=str(path),
            results=False,  # outcomes go to the ledger
            utc=True,
            fsync=False,  # explicit: the default depends on how SQLite was built
            storage_class=WakeableSqliteStorage,
        )
        os.chmod(path, 0o600)  # pickled payloads: whoever can write them can run code
        self._task: Any = None
        self.consumer = EmbeddedConsumer(
            self.huey,
            workers=workers,
            periodic=False,
            check_worker_health=True,
            health_check_interval=10,
            shutdown_timeout=5.0,
        )
        self.workers = workers

    def register(self, deliver: Callable[[Job], None]) -> None:
        """Register the delivery function as Huey's one task (retries are the ledger's job)."""
        self._task = self.huey.task(name=TASK_NAME, retries=0)(deliver)

    @property
    def storage(self) -> WakeableSqliteStorage:
        storage: WakeableSqliteStorage = self.huey.storage
        return storage

    def submit(self, job: Job) -> None:
        """Hand one job to a worker."""
        self._task(job)

    def start(self) -> None:
        self.consumer.start()

    def check_health(self) -> None:
        """Restart dead workers (Huey's own health check runs only in Consumer.run, which we skip)."""
        self.consumer.check_worker_health()

    def alive_workers(self) -> int:
        return self.consumer.alive_workers()

    def stop(self) -> None:
        """Stop the workers after their current task; call once no send is in flight."""
        self.consumer.stop_flag.set()
        self.storage.shut()
        self.consumer.stop(graceful=True)
        self.huey.storage.close()
