"""Huey, embedded: the worker threads that run deliveries, woken at once instead of polling.

Huey's queue here is a hand-off, not the record: the ledger is. Huey's SQLite storage deletes a
task row before running it and keeps retries in a schedule table that a crash can lose, so
retries, pacing and what waits live in the ledger, and the dispatcher hands each due message to
Huey afresh. A queue that is rebuilt from the ledger at every start gains nothing from being a
file, and measured it cost: 195-297 us of CPU per hand-off through SqliteStorage against 89 us
through Huey's MemoryStorage (5,000 hand-offs to 4 workers, one run each), about half of the
0.5 ms a delivery may cost in all. So the queue is Huey's in-memory storage; a queue.db left by
an older evomsgd is removed at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import Huey
from huey.consumer import Consumer
from huey.storage import MemoryStorage

from evomsgd.engine.jobs import Job

log = logging.getLogger("evomsgd.queue")

OLD_QUEUE_FILE = "queue.db"  # Huey's SQLite queue file of evomsgd before 0.2
TASK_NAME = "evomsgd.deliver"  # explicit: a dev run and the frozen binary must agree on names
_IDLE_WAIT = 1.0


class WakeableStorage(MemoryStorage):  # type: ignore[misc]
    """Huey's MemoryStorage whose dequeue waits on a condition instead of Huey's 0.1-10 s polling."""

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
        for name in (OLD_QUEUE_FILE, OLD_QUEUE_FILE + "-wal", OLD_QUEUE_FILE + "-shm"):
            # An older evomsgd's hand-off file: what it held is in the ledger (module docstring).
            (data_dir / name).unlink(missing_ok=True)
        self.huey = Huey(
            name="evomsgd",
            results=False,  # outcomes go to the ledger
            utc=True,
            storage_class=WakeableStorage,
        )
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

    def register(self, deliver: Callable[[list[Job]], None]) -> None:
        """Register the delivery function as Huey's one task (retries are the ledger's job)."""
        self._task = self.huey.task(name=TASK_NAME, retries=0)(deliver)

    @property
    def storage(self) -> WakeableStorage:
        storage: WakeableStorage = self.huey.storage
        return storage

    def submit(self, jobs: list[Job]) -> None:
        """Hand a step's jobs to a worker, as one task: a hand-off costs about 90 us whatever
        it carries."""
        self._task(jobs)

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
