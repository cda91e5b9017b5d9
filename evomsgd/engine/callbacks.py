"""The callback sender: delivers the outbox's rows, signed per Standard Webhooks, with retries.

The rows are already durable (the ledger's triggers wrote them with the change that caused
them); this job only reads what is due, posts it and writes the outcome through the group
committer. It has its own HTTP session, never Evolution's pool, and never waits on a call in
its loop: a slow or dead endpoint holds only its own few slots, never a send or another endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from evomsgd import __version__, clock
from evomsgd.config import Settings
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger import callbacks
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.records import CallbackOutcome, Due
from evomsgd.ledger.store import Store

log = logging.getLogger("evomsgd.callbacks")

TIMEOUT = 10.0  # seconds per call, connect included
FIRST_DELAY = 5.0  # the first retry's delay; it doubles per failure ...
MAX_DELAY = 3600.0  # ... up to an hour
JITTER = 0.25  # each delay is stretched by up to this fraction, at random
POLL = 1.0  # seconds between two looks at the outbox when nothing woke the sender
MAX_IN_FLIGHT = 64
PER_ENDPOINT = 4  # calls in flight to one endpoint (a dead one holds no more than these)
BATCH = 256

# Render a message's data (the task as GET /tasks/{id} shows it); None when it is gone.
Render = Callable[[str], dict[str, Any] | None]


def backoff(failures: int, rng: random.Random) -> float:
    """The delay before the next try after `failures` failures in a row (1 = the first)."""
    base: float = min(FIRST_DELAY * 2.0 ** max(0, failures - 1), MAX_DELAY)
    return min(base * (1 + JITTER * rng.random()), MAX_DELAY)


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), within an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 1.0), MAX_DELAY)


def sign(secrets: tuple[str, ...], webhook_id: str, at: int, body: bytes) -> str:
    """The webhook-signature header: one `v1,<base64>` per secret, space-separated."""
    stamp = datetime.fromtimestamp(at, UTC)
    text = body.decode()
    return " ".join(Webhook(secret).sign(webhook_id, stamp, text) for secret in secrets)


def envelope(type_: str, occurred_at: str, data: Any) -> bytes:
    """The Standard Webhooks body: {"type", "timestamp", "data"}."""
    payload = {"type": type_, "timestamp": clock.db_to_rfc3339(occurred_at), "data": data}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class CallbackSender:
    """Attempts due callbacks; `step` is one look at the outbox, `run` the daemon's loop."""

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        settings: Settings,
        render: Render,
        session: aiohttp.ClientSession,
        *,
        now: Callable[[], float] = clock.now,
        rng: random.Random | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.store = store
        self.committer = committer
        self.settings = settings
        self.render = render
        self.session = session
        self.now = now
        self.rng = rng or random.Random()
        self.timeout = timeout
        self._busy: dict[int, str] = {}  # callback id -> where it goes (for PER_ENDPOINT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the outbox now, not at the next poll."""
        self._wake.set()

    async def step(self) -> list[asyncio.Task[None]]:
        """Start an attempt for each due callback there is room for; returns their tasks."""
        room = MAX_IN_FLIGHT - len(self._busy)
        if room <= 0:
            return []
        due = await asyncio.to_thread(
            callbacks.due, self.store, self.now(), BATCH, tuple(self._busy)
        )
        started: list[asyncio.Task[None]] = []
        for item in due:
            target = item.row.endpoint or item.url or ""
            if (
                len(started) >= room
                or sum(t == target for t in self._busy.values()) >= PER_ENDPOINT
            ):
                continue
            self._busy[item.row.id] = target
            task = asyncio.create_task(self._attempt(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started.append(task)
        return started

    async def run(self) -> None:
        """Until cancelled: attempt what is due, then wait for a wake-up or the next poll."""
        while True:
            try:
                await self.step()
            except StoreUnavailable as exc:
                log.warning("callbacks: cannot read the outbox: %s", exc)
            except Exception:  # a bug must not end the callbacks for the daemon's lifetime
                log.exception("callbacks: the sender's step failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):
                    await self._wake.wait()
            self._wake.clear()

    async def stop(self) -> None:
        """Cancel the calls in flight; their rows stay pending and go again at the next start."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _attempt(self, item: Due) -> None:
        try:
            try:
                outcome = await self._call(item)
            except Exception:
                # Retried on the schedule, not every second: a bug here must not spin.
                log.exception("callback %s: cannot be attempted", item.row.id)
                outcome = self._retry(item, None, self.now(), None, "internal error (logged)")
            try:
                await self.committer.write_soon(lambda cur: callbacks.record_in(cur, outcome))
            except StoreUnavailable as exc:
                # The row stays pending: it is sent again (same webhook-id) once the ledger writes.
                log.warning("callback %s: outcome not recorded: %s", item.row.id, exc)
                return
            if outcome.state == "sent":
                self.wake()  # the next event of its message may go now
        finally:
            self._busy.pop(item.row.id, None)

    async def _body(self, item: Due) -> bytes:
        row = item.row
        if row.body is not None:
            return row.body
        if row.message_id is None:  # instance.paused / instance.resumed
            data: Any = {
                "instance": row.instance,
                "paused": row.type == "instance.paused",
                "reason": row.data,
            }
        else:
            data = await asyncio.to_thread(self.render, row.message_id)
            if data is None:  # purged by retention meanwhile
                data = {"task_id": row.message_id}
        return envelope(row.type, row.occurred_at, data)

    async def _call(self, item: Due) -> CallbackOutcome:
        row = item.row
        body = await self._body(item)
        started = self.now()
        if item.url is None:
            return self._failed(
                item, body, started, None, "no URL to send to (its endpoint has none)"
            )
        headers = {"Content-Type": "application/json", "User-Agent": f"evomsgd/{__version__}"}
        if row.kind == "event":
            at = int(time.time())  # wall time: receivers check it against theirs (5 minutes)
            headers["webhook-id"] = row.webhook_id
            headers["webhook-timestamp"] = str(at)
            headers["webhook-signature"] = sign(item.secrets, row.webhook_id, at, body)
        try:
            async with self.session.post(
                item.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                status, wait = resp.status, resp.headers.get("Retry-After")
                await resp.content.read(4096)  # a little of the answer, never kept
        except TimeoutError:
            return self._retry(item, body, started, None, f"no answer within {self.timeout:g}s")
        except aiohttp.ClientError as exc:
            return self._retry(item, body, started, None, f"{type(exc).__name__}: cannot connect")
        if 200 <= status < 300:
            return CallbackOutcome(row.id, started, body, "sent", None, status, None)
        if status == 410:
            if row.url is None and row.endpoint is not None:
                why = f"endpoint {row.endpoint!r} answered 410 Gone"
                log.warning(
                    "callbacks: %s; it is disabled until an operator re-enables it "
                    "(`evomsgd callbacks enable %s`)",
                    why,
                    row.endpoint,
                )
                return CallbackOutcome(
                    row.id, started, body, "pending", started, 410, "410 Gone", disable=why
                )
            return self._failed(item, body, started, 410, "410 Gone")
        delay = retry_after(wait, started) if status in (429, 503) else None
        return self._retry(item, body, started, status, f"HTTP {status}", delay)

    def _retry(
        self,
        item: Due,
        body: bytes | None,
        now: float,
        status: int | None,
        error: str,
        delay: float | None = None,
    ) -> CallbackOutcome:
        row = item.row
        wait = delay if delay is not None else backoff(row.failures + 1, self.rng)
        since = clock.from_db(row.retry_from or row.occurred_at)
        if now + wait > since + self.settings.callback_max_age:
            return self._failed(
                item, body, now, status, f"{error}; given up after EVOMSGD_CALLBACK_MAX_AGE"
            )
        log.info(
            "callback %s (%s) to %s: %s; retrying in %.0fs",
            row.id,
            row.type,
            row.endpoint or "relay",
            error,
            wait,
        )
        return CallbackOutcome(row.id, now, body, "pending", now + wait, status, error)

    def _failed(
        self, item: Due, body: bytes | None, now: float, status: int | None, error: str
    ) -> CallbackOutcome:
        log.warning(
            "callback %s (%s) to %s failed: %s",
            item.row.id,
            item.row.type,
            item.row.endpoint or "relay",
            error,
        )
        return CallbackOutcome(item.row.id, now, body, "failed", None, status, error)
