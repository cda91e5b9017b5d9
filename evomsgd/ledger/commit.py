"""Group commit: one writer thread turns concurrent writes into one fsynced transaction.

One fsync per write caps a small VPS at a few hundred a second. Writes that arrive while a commit
is in progress wait for the next one and share its fsync: new messages from POST /messages (a 202
still means "on disk"), and the delivery engine's claims and outcomes, so many attempts share one
transaction too. The ledger's one write path runs here, or through `Store.transaction()` for the
rare writes an operator asks for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.records import InsertResult, NewMessage
from evomsgd.ledger.store import Store

log = logging.getLogger("evomsgd.commit")

MAX_BATCH = 512
OUTAGE_LOG_EVERY = 10.0  # seconds between two "still refusing" warnings
ACCEPT_MEMORY = 0.05
# The loop is "late" when the hop of a batch's answers to it took longer than this: it has a
# long queue of callbacks (sends in flight) ahead of every request.
LATE_AFTER = 0.005
_STOP = object()

T = TypeVar("T")
F = TypeVar("F", "concurrent.futures.Future[Any]", "asyncio.Future[Any]")


@dataclass(slots=True)
class _Insert:
    new: NewMessage
    future: asyncio.Future[InsertResult]


@dataclass(slots=True)
class _Write:
    op: Callable[[sqlite3.Cursor], Any]
    future: concurrent.futures.Future[Any] | asyncio.Future[Any]


class GroupCommitter:
    """Accepts NewMessages from the event loop and writes from any thread; resolves each once
    its batch committed."""

    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop,
        *,
        idempotency_ttl: float,
        on_commit: Callable[[Sequence[NewMessage], Sequence[InsertResult]], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.loop = loop
        self.idempotency_ttl = idempotency_ttl
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Insert | _Write | object] = queue.SimpleQueue()
        self._refused = 0  # messages refused since the ledger stopped taking writes
        self._warned_at = 0.0
        self._stopped = False
        self._accepts_waiting = 0  # submit() calls not yet answered (on the loop)
        self._last_accept = -ACCEPT_MEMORY  # when the latest submit() was answered
        self._monotonic = monotonic
        self._hop_took = 0.0  # seconds the latest batch's answers waited for the loop
        self._thread = threading.Thread(target=self._run, name="evomsgd-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        self._stopped = True
        self._queue.put(_STOP)
        self._thread.join()

    async def submit(self, new: NewMessage) -> InsertResult:
        """Queue one message for the next commit and wait until it is durable."""
        future: asyncio.Future[InsertResult] = self.loop.create_future()
        self._accepts_waiting += 1
        self._queue.put(_Insert(new, future))
        try:
            return await future
        finally:
            self._accepts_waiting -= 1
            self._last_accept = self._monotonic()

    def accepting(self) -> bool:
        """True while a new message waits for its commit, or one was answered within
        ACCEPT_MEMORY seconds (a client in a burst sends its next soon after); from any thread."""
        return self._accepts_waiting > 0 or self._monotonic() - self._last_accept < ACCEPT_MEMORY

    def loop_late(self) -> bool:
        """True when the latest batch's answers waited over LATE_AFTER seconds for the event
        loop; from any thread."""
        return self._hop_took > LATE_AFTER

    def _answer(self, answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
        """Hand a batch's answers to the loop in one hop (not one per request or per write),
        timing the hop."""
        self.loop.call_soon_threadsafe(self._resolve, self._monotonic(), answers)

    def _resolve(self, posted: float, answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
        self._hop_took = self._monotonic() - posted
        _resolve(answers)

    def write(self, op: Callable[[sqlite3.Cursor], T]) -> concurrent.futures.Future[T]:
        """Run `op` inside the next batch's transaction; the future resolves once it committed
        (or fails with StoreUnavailable, for every write of the batch)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        return self._enqueue(op, future)

    def write_soon(self, op: Callable[[sqlite3.Cursor], T]) -> asyncio.Future[T]:
        """`write` for the event loop: the loop's future is resolved with the batch's others in
        one hop to the loop, not one hop per write."""
        future: asyncio.Future[T] = self.loop.create_future()
        return self._enqueue(op, future)

    def _enqueue(self, op: Callable[[sqlite3.Cursor], Any], future: F) -> F:
        if self._stopped:
            future.set_exception(
                StoreUnavailable("the ledger's writer has stopped (shutting down)")
            )
        else:
            self._queue.put(_Write(op, future))
        return future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Insert | _Write] = [first]  # type: ignore[list-item]
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

    def _commit(self, batch: list[_Insert | _Write]) -> None:
        inserts = [item for item in batch if isinstance(item, _Insert)]
        writes = [item for item in batch if isinstance(item, _Write)]
        news = [item.new for item in inserts]
        ops: list[Callable[[sqlite3.Cursor], Any]] = [item.op for item in writes]
        if news:
            # One executemany for the batch's new messages, first: a claim in the same batch
            # may be for a message accepted in it.
            ops.insert(0, lambda cur: self.store.insert_in(cur, news, self.idempotency_ttl))
        try:
            results: list[Any] | BaseException = self.store.write_batch(ops)
        except StoreUnavailable as exc:
            results = exc
            if inserts:
                self._refusing(len(inserts), exc)
        except Exception as exc:  # never leave a request or a worker hanging
            log.exception("group commit of %s writes failed", len(batch))
            results = exc
        failed = isinstance(results, BaseException)
        # Only new messages tell: on a full disk an update in place can still succeed while an
        # insert, which needs a new page, cannot.
        if self._refused and inserts and not failed:
            log.warning(
                "the ledger takes writes again (messages refused meanwhile: %s)",
                self._refused,
            )
            self._refused = 0
        inserted: Sequence[InsertResult] | BaseException = (
            results if isinstance(results, BaseException) else (results[0] if news else [])
        )
        # Before the answers go out: a client that got its 202 must already count in the
        # lane's backlog (backpressure) and the dispatcher must already know of the message.
        if self._on_commit is not None and news and not isinstance(inserted, BaseException):
            self._on_commit(news, inserted)
        offset = 1 if news else 0
        on_loop: list[tuple[asyncio.Future[Any], Any]] = [
            (item.future, inserted if isinstance(inserted, BaseException) else inserted[index])
            for index, item in enumerate(inserts)
        ]
        for index, item in enumerate(writes):
            outcome = results if isinstance(results, BaseException) else results[index + offset]
            if isinstance(item.future, asyncio.Future):
                on_loop.append((item.future, outcome))
            elif isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        if on_loop:
            self._answer(on_loop)

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


def _resolve(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in answers:
        if future.done():  # the client went away
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
