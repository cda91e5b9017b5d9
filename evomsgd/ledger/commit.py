"""Group commit: one writer thread turns concurrent POSTs into one fsynced transaction.

One fsync per request caps a small VPS at a few hundred requests a second. Requests that arrive
while a commit is in progress wait for the next one and share its fsync, so a 202 still means
"on disk" while throughput grows with concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.records import InsertResult, NewMessage
from evomsgd.ledger.store import Store

log = logging.getLogger("evomsgd.commit")

MAX_BATCH = 512
OUTAGE_LOG_EVERY = 10.0  # seconds between two "still refusing" warnings
_STOP = object()

Pending = tuple[NewMessage, "asyncio.Future[InsertResult]"]


class GroupCommitter:
    """Accepts NewMessages from the event loop; resolves each future once its batch committed."""

    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop,
        *,
        idempotency_ttl: float,
        on_commit: Callable[[Sequence[NewMessage], Sequence[InsertResult]], None] | None = None,
    ) -> None:
        self.store = store
        self.loop = loop
        self.idempotency_ttl = idempotency_ttl
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Pending | object] = queue.SimpleQueue()
        self._refused = 0  # messages refused since the ledger stopped taking writes
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="evomsgd-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    async def submit(self, new: NewMessage) -> InsertResult:
        """Queue one message for the next commit and wait until it is durable."""
        future: asyncio.Future[InsertResult] = self.loop.create_future()
        self._queue.put((new, future))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[Pending] = [first]  # type: ignore[list-item]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            self._commit(batch)

    def _commit(self, batch: list[Pending]) -> None:
        news = [new for new, _ in batch]
        futures = [future for _, future in batch]
        try:
            results: Sequence[InsertResult] | BaseException = self.store.insert_messages(
                news, idempotency_ttl=self.idempotency_ttl
            )
        except StoreUnavailable as exc:
            results = exc
            self._refusing(len(batch), exc)
        except Exception as exc:  # never leave a request hanging
            log.exception("group commit of %s messages failed", len(batch))
            results = exc
        if self._refused and not isinstance(results, BaseException):
            log.warning(
                "the ledger takes writes again (messages refused meanwhile: %s)",
                self._refused,
            )
            self._refused = 0
        # Before the answers go out: a client that got its 202 must already count in the
        # lane's backlog (backpressure) and the dispatcher must already know of the message.
        if self._on_commit is not None and not isinstance(results, BaseException):
            self._on_commit(news, results)
        # One hop to the loop per batch, not one per request.
        self.loop.call_soon_threadsafe(_resolve, futures, results)

    def _refusing(self, count: int, exc: StoreUnavailable) -> None:
        """Each client gets its 503; the operator gets a warning now and then, not one per request."""
        now = time.monotonic()
        first = self._refused == 0
        self._refused += count
        if first or now - self._warned_at >= OUTAGE_LOG_EVERY:
            self._warned_at = now
            log.error(
                "refusing new messages (503): %s%s",
                exc,
                "" if first else f" ({self._refused} refused so far)",
            )


def _resolve(
    futures: list[asyncio.Future[InsertResult]], results: Sequence[InsertResult] | BaseException
) -> None:
    for index, future in enumerate(futures):
        if future.done():  # the client went away
            continue
        if isinstance(results, BaseException):
            future.set_exception(results)
        else:
            future.set_result(results[index])
