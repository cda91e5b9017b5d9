"""What the daemon can be asked to do, independent of HTTP: accept, look up, cancel, retry."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from evomsgd import __version__, clock, egress, ids
from evomsgd.config import Settings
from evomsgd.engine import fetch
from evomsgd.engine.dispatcher import Dispatcher
from evomsgd.engine.jobs import Finished, Job
from evomsgd.engine.lanes import BLOCKING
from evomsgd.engine.receipts import Receipts
from evomsgd.errors import (
    Backpressure,
    Conflict,
    InvalidInput,
    NotFound,
    ShuttingDown,
    StoreUnavailable,
    TooLarge,
)
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.media import MediaFiles, Stored
from evomsgd.ledger.receipts import silent_instances
from evomsgd.ledger.records import (
    Event,
    InsertResult,
    ListFilter,
    MediaRef,
    Message,
    NewMessage,
)
from evomsgd.ledger.store import Store
from evomsgd.media import (
    DEFAULT_STEM,
    Checked,
    MediaError,
    extension_of,
    from_base64,
    mimetype_of,
)
from evomsgd.media import check as check_media
from evomsgd.models import HealthView, LaneView, MediaIn, SendRequest
from evomsgd.phone import PhoneError, normalize


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One message as the service knows it: its row, its history (None in lists), and why its
    instance is not sending right now (paused, down, ...), which the row alone cannot tell."""

    message: Message
    history: list[Event] | None
    waiting_because: str | None
    no_receipts: bool = False  # its instance's integration emits no receipts (EVOLUTION)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """A page of messages, newest first; `next_before` is the cursor of the next page."""

    tasks: list[TaskRecord]
    next_before: str | None


@dataclass
class Service:
    """The daemon's operations; every blocking ledger call runs in a thread, never on the loop."""

    settings: Settings
    store: Store
    committer: GroupCommitter
    dispatcher: Dispatcher
    data_dir: Path
    alive_workers: Callable[[], int] = lambda: 0
    started_monotonic: float = field(default_factory=time.monotonic)
    receipts: Receipts | None = None

    # -- accepting ------------------------------------------------------------------------

    def build(
        self,
        req: SendRequest,
        *,
        idempotency_key: str | None = None,
        token_name: str | None = None,
        upload: bool = False,
    ) -> NewMessage:
        """Validate what pydantic cannot (config-dependent rules) and prepare the ledger row.

        Media bytes (base64, a multipart `upload`, a fetched URL) are checked and stored by
        `store_media`, which the caller awaits next."""
        problems: list[dict[str, Any]] = []
        text = req.message
        media: MediaRef | None = None
        if req.media is not None:
            text, media = self._media_rules(req, req.media, upload, problems)
        elif text is None:
            problems.append({"field": "message", "message": "Field required"})
        if text is not None and len(text) > self.settings.max_text_length:
            problems.append(
                {
                    "field": "message",
                    "message": f"is {len(text)} characters; at most {self.settings.max_text_length} "
                    "are accepted (EVOMSGD_MAX_TEXT_LENGTH)",
                }
            )
        if text is not None and not text.strip() and req.media is None:
            problems.append(
                {"field": "message", "message": "is blank; WhatsApp cannot send an empty text"}
            )
        instance = req.instance_name or self.settings.instance_fallback
        if not instance:
            problems.append(
                {
                    "field": "instance_name",
                    "message": "is required: no default instance is configured (set EVOLUTION_INSTANCE_NAME)",
                }
            )
        try:
            recipient = normalize(req.phone, self.settings.default_region)
        except PhoneError as exc:
            problems.append({"field": "phone", "message": str(exc)})
            recipient = None
        now = clock.now()
        send_at = clock.from_datetime(req.send_at) if req.send_at else None
        due = max(now, send_at or now)  # expiry counts from when the message may first be sent
        expires_at = due + self.settings.default_expiry
        if req.expires_in is not None:
            expires_at = due + req.expires_in
        if req.expires_at is not None:
            expires_at = clock.from_datetime(req.expires_at)
        for name, ts in (("send_at", send_at), ("expires_at", expires_at)):
            if ts is not None and not clock.storable(ts):
                problems.append({"field": name, "message": "is out of range (years 1970-9999)"})
        if expires_at <= due:
            problems.append(
                {
                    "field": "expires_at",
                    "message": "is not after the time the message would be sent (now or send_at)",
                }
            )
        if problems:
            raise InvalidInput(problems)
        assert recipient is not None and instance is not None and text is not None
        request_hash = None
        if idempotency_key is not None:
            request_hash = _fingerprint(req, instance, recipient.number, None)
        return NewMessage(
            id=ids.task_id(now),
            instance=instance,
            phone=recipient.number,
            phone_input=req.phone,
            text=text,
            priority=1 if req.priority == "high" else 0,
            created_at=now,
            send_at=send_at,
            expires_at=expires_at,
            sandbox=self.settings.sandbox,
            idempotency_key=None
            if idempotency_key is None
            else f"{token_name or ''}:{idempotency_key}",
            request_hash=request_hash,
            token_name=token_name,
            media=media,
        )

    def _media_rules(
        self,
        req: SendRequest,
        media: MediaIn,
        upload: bool,
        problems: list[dict[str, Any]],
    ) -> tuple[str, MediaRef | None]:
        """The caption and the media as far as they can be checked without the bytes."""
        if req.message is not None and media.caption is not None and req.message != media.caption:
            problems.append(
                {
                    "field": "media.caption",
                    "message": "differs from message - give the caption in one of them",
                }
            )
        caption = media.caption or req.message or ""
        sources = [name for name, given in (("url", media.url), ("base64", media.base64)) if given]
        if upload:
            sources.append("file")
        if len(sources) != 1:
            problems.append(
                {
                    "field": "media",
                    "message": "needs exactly one of url or base64 (or a multipart file part), "
                    f"got {' and '.join(sources) or 'none'}",
                }
            )
            return caption, None
        fetching = self.settings.media_fetch if media.fetch is None else media.fetch
        if media.fetch and media.url is None:
            problems.append({"field": "media.fetch", "message": "applies only to url media"})
        if media.url is None:
            return caption, MediaRef(media.type, media.mimetype, media.filename)
        try:
            parts = egress.parse(media.url)
            if fetching:
                egress.check(media.url, self.settings.media_fetch_allowed, fetch.SETTING)
        except egress.UrlError as exc:
            problems.append({"field": "media.url", "message": str(exc)})
            return caption, None
        if fetching:
            return caption, MediaRef(media.type, media.mimetype, media.filename)
        host = parts.hostname or ""
        if "." not in host and ":" not in host:
            # Evolution's isURL wants a dotted host name or an IP: anything else is its 400.
            problems.append(
                {
                    "field": "media.url",
                    "message": f"has the host {host!r}: Evolution downloads only from a dotted "
                    "host name or an IP address - use one, or fetch: true to have evomsgd "
                    "download it",
                }
            )
            return caption, None
        filename = media.filename or PurePosixPath(unquote(parts.path)).name or None
        mimetype = media.mimetype or (mimetype_of(filename) if filename else None)
        if filename is None:
            filename = DEFAULT_STEM[media.type] + (extension_of(mimetype or "") or "")
        return caption, MediaRef(media.type, mimetype, filename, url=media.url)

    async def store_media(
        self, new: NewMessage, req: SendRequest, upload: bytes | None = None
    ) -> NewMessage:
        """Check the media's bytes (base64, the multipart `upload`, or downloaded) and store
        them durably; the message to accept. 413 over EVOMSGD_MAX_MEDIA_BYTES, 422 when the
        bytes are not what the request says."""
        ref, media = new.media, req.media
        if ref is None or media is None or ref.url is not None:
            return new  # a text, or a URL Evolution downloads itself: no bytes here
        limit = self.settings.max_media_bytes
        if upload is not None:
            data = upload
        elif media.base64 is not None:
            # base64 is 4 characters per 3 bytes: refuse before decoding what cannot fit.
            padding = min(2, len(media.base64) - len(media.base64.rstrip("=")))
            if (size := len(media.base64) // 4 * 3 - padding) > limit:
                raise _too_large(size, limit)
            data = await asyncio.to_thread(_decode_base64, media.base64)
        else:
            assert media.url is not None
            try:
                data = await fetch.fetch(
                    media.url,
                    self.settings.media_fetch_allowed,
                    limit=limit,
                    timeout=self.settings.media_fetch_timeout,
                )
            except fetch.FetchTooLarge as exc:
                raise TooLarge(
                    f"media: {exc}; at most {limit} bytes are accepted (EVOMSGD_MAX_MEDIA_BYTES)"
                ) from None
            except fetch.FetchError as exc:
                raise InvalidInput([{"field": "media.url", "message": str(exc)}]) from None
        if len(data) > limit:
            raise _too_large(len(data), limit)
        filename = ref.filename
        if filename is None and media.url is not None:
            filename = PurePosixPath(unquote(urlsplit(media.url).path)).name or None
        files = self.media_files

        def check_and_store() -> tuple[Checked, Stored]:
            checked = check_media(ref.kind, data, mimetype=ref.mimetype, filename=filename)
            return checked, files.put(data)

        try:
            checked, stored = await asyncio.to_thread(check_and_store)
        except MediaError as exc:
            raise InvalidInput([{"field": exc.field, "message": str(exc)}]) from None
        except OSError as exc:
            raise StoreUnavailable(f"media not stored: {exc}", retry_after=5) from exc
        new.media = MediaRef(
            ref.kind, checked.mimetype, checked.filename, stored.sha256, stored.size
        )
        if new.request_hash is not None:
            new.request_hash = _fingerprint(req, new.instance, new.phone, stored.sha256)
        return new

    @functools.cached_property
    def media_files(self) -> MediaFiles:
        """The media files beside the ledger."""
        return MediaFiles(self.data_dir)

    async def accept(self, new: NewMessage) -> InsertResult:
        """Write one message durably (group commit); the caller answers 202 after this returns."""
        if self.dispatcher.draining:
            raise ShuttingDown("evomsgd is shutting down - retry in a few seconds", retry_after=5)
        self._check_backlog(new)
        await self._check_new_contact_budget(new)
        try:
            return await self.committer.submit(new)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"message not accepted: {exc}", retry_after=5) from exc

    def _check_backlog(self, new: NewMessage) -> None:
        """429 rather than accept a message the instance cannot send in time (or at all)."""
        waiting, pace = self.dispatcher.backlog(new.instance)
        cap = self.settings.max_waiting_for(new.instance)
        if waiting >= cap:
            retry_after = max(1, math.ceil((waiting - cap + 1) * max(pace, 0.1)))
            raise Backpressure(
                f"instance {new.instance!r} already has {waiting} waiting messages (limit {cap}, "
                "EVOMSGD_MAX_WAITING) - retry later",
                code="queue_full",
                retry_after=retry_after,
            )
        estimated = waiting * pace
        start = max(new.created_at, new.send_at or new.created_at)
        if pace and start + estimated > new.expires_at:
            retry_after = max(1, math.ceil(start + estimated - new.expires_at))
            raise Backpressure(
                f"instance {new.instance!r} has {waiting} waiting messages, about {estimated:.0f}s of "
                f"sending at its pace; this message would expire first - retry later or give it a "
                "longer expires_in",
                code="queue_too_slow",
                retry_after=retry_after,
            )

    async def _check_new_contact_budget(self, new: NewMessage) -> None:
        """429 rather than accept a message to a new contact that would expire before the
        instance's new-contact budget allows it."""
        # Only once the budget is used up (the dispatcher's counter, no SQL) is the ledger asked
        # whether the recipient is new: one primary-key read, off the event loop.
        reset = self.dispatcher.new_contacts_reset(new.instance)
        if (
            reset is not None
            and new.expires_at <= reset
            and await asyncio.to_thread(self.store.is_new_contact, new.instance, new.phone)
        ):
            raise Backpressure(
                f"instance {new.instance!r} has written to all the new contacts it may today "
                f"(new_contacts_per_day) and never sent to this recipient; the message would "
                f"expire before {clock.to_rfc3339(reset)}, when it could go - retry then or give "
                "it a longer expires_in",
                code="queue_too_slow",
                retry_after=max(1, math.ceil(reset - new.created_at)),
            )

    # -- reading --------------------------------------------------------------------------

    async def task(self, message_id: str) -> TaskRecord:
        """One message with its history; NotFound when unknown."""
        return await asyncio.to_thread(self._task_sync, message_id)

    def _task_sync(self, message_id: str) -> TaskRecord:
        msg = self.store.get(message_id)
        if msg is None:
            raise NotFound(
                f"no task with id {message_id!r} - check the task_id returned by POST /messages"
            )
        return self._view(msg, self.store.history(message_id), silent_instances(self.store))

    def _view(
        self, msg: Message, history: list[Event] | None, silent: frozenset[str]
    ) -> TaskRecord:
        return TaskRecord(
            msg, history, self.dispatcher.waiting_because(msg.instance), msg.instance in silent
        )

    async def tasks(self, flt: ListFilter) -> TaskPage:
        """A page of messages, newest first."""

        def run() -> TaskPage:
            rows = self.store.list_messages(flt)
            more = len(rows) == flt.limit
            silent = silent_instances(self.store)
            return TaskPage(
                [self._view(msg, None, silent) for msg in rows],
                str(rows[-1].seq) if more and rows else None,
            )

        return await asyncio.to_thread(run)

    async def media_file(self, message_id: str) -> tuple[Path, MediaRef]:
        """Where a task's stored media file is, with what it is; NotFound when the task has
        none (a text, a url medium) or the file is gone."""

        def run() -> tuple[Path, MediaRef]:
            msg = self.store.get(message_id)
            if msg is None:
                raise NotFound(f"no task with id {message_id!r}")
            media = msg.media
            if media is None or media.sha256 is None:
                raise NotFound(f"task {message_id} has no stored media file")
            path = self.media_files.path(media.sha256)
            if not path.is_file():
                raise NotFound(
                    f"the media file of task {message_id} is no longer in the data directory"
                )
            return path, media

        return await asyncio.to_thread(run)

    # -- Evolution's webhooks -------------------------------------------------------------

    async def webhook_authentic(self, presented: str | None) -> bool:
        """True when `presented` is the webhook secret `evomsgd webhook setup` gave Evolution."""
        return self.receipts is not None and await self.receipts.authentic(presented)

    async def receive_webhook(self, body: Any) -> str:
        """Store and apply one Evolution webhook body (durable when this returns)."""
        if self.receipts is None:
            raise ShuttingDown("evomsgd is starting or stopping - retry in a few seconds")
        try:
            return await self.receipts.receive(body)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"webhook not stored: {exc}", retry_after=5) from exc

    # -- operators ------------------------------------------------------------------------

    async def cancel(self, message_id: str) -> TaskRecord:
        """Cancel an unsent message; 409 once it is being sent or is final."""

        def run() -> TaskRecord:
            changed, msg = self.store.cancel(message_id, clock.now())
            if msg is None:
                raise NotFound(f"no task with id {message_id!r}")
            if not changed:
                raise Conflict(
                    f"task {message_id} is {msg.status.value}; only a message that waits "
                    "(PENDING, SCHEDULED, RETRY) can be canceled",
                    code="too_late",
                )
            self.dispatcher.finished(Finished(Job(msg.id, msg.instance), final=True))
            return self._view(msg, self.store.history(message_id), frozenset())

        return await asyncio.to_thread(run)

    async def retry(self, message_id: str) -> TaskRecord:
        """Queue a FAILURE/EXPIRED/CANCELED message again, keeping its history."""

        def run() -> TaskRecord:
            now = clock.now()
            changed, msg = self.store.requeue(message_id, now, now + self.settings.default_expiry)
            if msg is None:
                raise NotFound(f"no task with id {message_id!r}")
            if not changed:
                raise Conflict(
                    f"task {message_id} is {msg.status.value}; only FAILURE, EXPIRED "
                    "or CANCELED messages whose text was not erased can be retried",
                    code="not_retryable",
                )
            self.dispatcher.accepted({msg.instance: 1})
            return self._view(msg, self.store.history(message_id), frozenset())

        return await asyncio.to_thread(run)

    async def set_paused(self, instance: str, paused: bool, reason: str | None) -> None:
        """Pause or resume one instance's sending; survives restarts."""
        await asyncio.to_thread(self.store.set_paused, instance, paused, reason, clock.now())
        self.dispatcher.set_operator_pause(instance, paused, reason)

    def lanes(self, only: frozenset[str] | None = None) -> list[LaneView]:
        """Each instance's lane (only those in `only`, a scoped token's instances, when given)."""
        return [
            lane for lane in self.dispatcher.lanes_view() if only is None or lane.instance in only
        ]

    @property
    def draining(self) -> bool:
        """True once the daemon stopped accepting (SIGTERM)."""
        return self.dispatcher.draining

    def drain(self) -> None:
        """Stop accepting and dispatching; in-flight sends finish."""
        self.dispatcher.drain()

    # -- health ---------------------------------------------------------------------------

    async def health(self, only: frozenset[str] | None = None) -> HealthView:
        """Everything /health reports; status 'down' when the daemon cannot do its job.

        `only` limits the instances shown (a scoped token's): their lanes and last error.
        """

        def run() -> tuple[dict[str, int], float | None, str | None, dict[str, Any] | None]:
            return (
                self.store.counts(),
                self.store.oldest_waiting(clock.now()),
                self.store.write_problem(),
                self.store.last_error(),
            )

        problems: list[str] = []
        try:
            counts, oldest, write_problem, last_error = await asyncio.to_thread(run)
        except StoreUnavailable as exc:
            counts, oldest, write_problem, last_error = {}, None, str(exc), None
        writable = write_problem is None
        alive = self.alive_workers()
        if write_problem is not None:
            problems.append(f"database not writable: {write_problem}")
        if alive < self.settings.workers:
            problems.append(
                f"{self.settings.workers - alive} of {self.settings.workers} worker threads are dead"
            )
        lanes = self.lanes(only)
        if last_error is not None and only is not None and last_error["instance"] not in only:
            last_error = None
        degraded = [
            f"instance {lane.instance} is {lane.state}: {lane.problem}"
            for lane in lanes
            if lane.state in BLOCKING
        ]
        status = (
            "down"
            if (not writable or alive == 0)
            else ("degraded" if problems or degraded else "ok")
        )
        if self.settings.sandbox:
            problems.insert(0, "SANDBOX MODE: messages are recorded, never sent to Evolution")
        return HealthView(
            status=status,
            version=__version__,
            uptime_seconds=round(time.monotonic() - self.started_monotonic, 3),
            sandbox=self.settings.sandbox,
            draining=self.dispatcher.draining,
            evolution_url=None if self.settings.sandbox else self.settings.evolution_url,
            data_dir=str(self.data_dir),
            database_writable=writable,
            workers_alive=alive,
            workers_configured=self.settings.workers,
            counts=counts,
            oldest_waiting_seconds=None if oldest is None else round(oldest, 3),
            instances=lanes,
            last_error=last_error,
            problems=problems + degraded,
        )


def created_per_instance(
    news: Sequence[NewMessage], results: Sequence[InsertResult]
) -> dict[str, int]:
    """How many new messages each instance got from one committed batch (replays excluded)."""
    counts: dict[str, int] = {}
    for new, result in zip(news, results, strict=True):
        if result.outcome == "created":
            counts[new.instance] = counts.get(new.instance, 0) + 1
    return counts


def _fingerprint(req: SendRequest, instance: str, phone: str, media_sha256: str | None) -> str:
    """The idempotency fingerprint of a request: the same key with a different body (the media's
    bytes included, by their hash) is a conflict."""
    canonical = req.model_dump(mode="json", exclude_none=True, exclude={"media"})
    canonical["instance_name"] = instance
    canonical["phone"] = phone
    canonical.pop("expires_in", None)  # relative: the same retry a second later is the same request
    if req.media is not None:
        described = req.media.model_dump(mode="json", exclude_none=True, exclude={"base64"})
        if media_sha256 is not None:
            described["sha256"] = media_sha256
        canonical["media"] = described
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _decode_base64(value: str) -> bytes:
    """Standard base64 (Evolution's rule: no data: prefix, no line breaks); 422 otherwise."""
    try:
        return from_base64(value)
    except ValueError:
        raise InvalidInput(
            [
                {
                    "field": "media.base64",
                    "message": "is not standard base64 (A-Z a-z 0-9 + /, = padding, no data: "
                    "prefix, no line breaks)",
                }
            ]
        ) from None


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"media is {size} bytes; at most {limit} are accepted (EVOMSGD_MAX_MEDIA_BYTES)"
    )
