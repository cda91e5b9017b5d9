"""What the daemon can be asked to do, independent of HTTP: accept, look up, cancel, retry.

Why one module of about 770 lines: it is the one facade both edges (web/ and, through the
daemon, the CLI) call, and each method is a short domain rule over the ledger and the engine
that raises domain errors. The largest part is accepting (build, the media's bytes, the
backpressure and budget checks), whose steps must run in order on one request; the rest is one
method per question an operator can ask.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import re
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
from evomsgd.ledger import callbacks as ledger_callbacks
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.media import MediaFiles, Stored
from evomsgd.ledger.receipts import silent_instances
from evomsgd.ledger.records import (
    CallbackRow,
    Endpoint,
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
from evomsgd.models import WAITING, HealthView, LaneView, MediaIn, ReplicationView, SendRequest
from evomsgd.phone import PhoneError, normalize

# An event name Evolution puts in a by-event webhook path (messages-update): one plain segment.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
    # The ledger's replication (engine/replication.py), when EVOMSGD_REPLICA_URL is set.
    replication: Callable[[], ReplicationView] | None = None

    # -- accepting ------------------------------------------------------------------------

    def build(
        self,
        req: SendRequest,
        *,
        idempotency_key: str | None = None,
        token_name: str | None = None,
        upload: bool = False,
        token_callback: bool = False,
    ) -> NewMessage:
        """Validate what pydantic cannot (config-dependent rules) and prepare the ledger row;
        `token_callback`: the token has its own callback endpoint.

        Media bytes (base64, a multipart `upload`, a fetched URL) are checked and stored by
        `store_media`, which the caller awaits next."""
        problems: list[dict[str, Any]] = []
        callback_to = self._callback_to(req, token_name, token_callback, problems)
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
            callback_to=callback_to,
            callback_url=req.callback_url if callback_to else None,
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

    def _callback_to(
        self,
        req: SendRequest,
        token_name: str | None,
        token_callback: bool,
        problems: list[dict[str, Any]],
    ) -> str | None:
        """The endpoint a message's callbacks go to (its secret signs them): the token's own,
        else the default; None when there is none. A `callback_url` must be allowed."""
        if token_name is not None and token_callback:
            endpoint: str | None = ledger_callbacks.token_endpoint(token_name)
        else:
            endpoint = ledger_callbacks.DEFAULT if self.settings.callback_secret else None
        if req.callback_url is None:
            if endpoint == ledger_callbacks.DEFAULT and not self.settings.callback_url:
                return None
            return endpoint
        try:
            egress.check(
                req.callback_url, self.settings.callback_allowed, "EVOMSGD_CALLBACK_ALLOWED"
            )
        except egress.UrlError as exc:
            problems.append({"field": "callback_url", "message": str(exc)})
            return None
        if endpoint is None:
            problems.append(
                {
                    "field": "callback_url",
                    "message": "has no secret to sign its callbacks: set EVOMSGD_CALLBACK_SECRET "
                    "or create the token with --callback-url",
                }
            )
        return endpoint

    async def accept(self, new: NewMessage) -> InsertResult:
        """Write one message durably (group commit); the caller answers 202 after this returns."""
        if self.dispatcher.draining:
            raise ShuttingDown("evomsgd is shutting down - retry in a few seconds", retry_after=5)
        self._check_backlog(new)
        await self._check_new_contact_budget(new)
        self._check_warmup(new)
        self._check_quiet_hours(new)
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

    def _check_warmup(self, new: NewMessage) -> None:
        """429 rather than accept a message that the warm-up's daily caps would hold, behind the
        instance's waiting messages, until after it expires."""
        free_at = self.dispatcher.warmup_free_at(new.instance)
        if free_at is not None and new.expires_at <= free_at:
            raise Backpressure(
                f"instance {new.instance!r} is warming up (warmup_days): its daily caps, with the "
                f"messages waiting on it, leave no room for this message before "
                f"{clock.to_rfc3339(free_at)}, after it would expire - retry then or give it a "
                "longer expires_in",
                code="queue_too_slow",
                retry_after=max(1, math.ceil(free_at - new.created_at)),
            )

    def _check_quiet_hours(self, new: NewMessage) -> None:
        """429 rather than accept a message that quiet hours where its recipient lives would
        hold until after it expires."""
        start = max(new.created_at, new.send_at or new.created_at)
        hold = self.dispatcher.quiet_hold(new.instance, new.phone, new.priority, start)
        if hold is not None and new.expires_at <= hold.until:
            raise Backpressure(
                f"{hold.because()} ({clock.to_rfc3339(hold.until)}, quiet_hours on instance "
                f"{new.instance!r}): the message would expire first - retry then, give it a "
                "longer expires_in, or send it with priority high if it cannot wait",
                code="queue_too_slow",
                retry_after=max(1, math.ceil(hold.until - new.created_at)),
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

    def task_record(self, message_id: str) -> TaskRecord | None:
        """`task`, called from a thread (the callback sender's); None when the message is gone."""
        try:
            return self._task_sync(message_id)
        except NotFound:
            return None

    def _view(
        self, msg: Message, history: list[Event] | None, silent: frozenset[str]
    ) -> TaskRecord:
        because = self.dispatcher.waiting_because(msg.instance)
        if because is None and msg.status in WAITING:
            hold = self.dispatcher.quiet_hold(msg.instance, msg.phone, msg.priority)
            because = None if hold is None else hold.because()
        return TaskRecord(msg, history, because, msg.instance in silent)

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

    async def receive_webhook(
        self, body: Any, raw: bytes | None = None, path_event: str | None = None
    ) -> str:
        """Store and apply one Evolution webhook body (durable when this returns); with `raw`,
        the body as received is queued for the instance's relay first, when it has one."""
        if self.receipts is None:
            raise ShuttingDown("evomsgd is starting or stopping - retry in a few seconds")
        try:
            if raw is not None:
                await self._relay(body, raw, path_event)
            return await self.receipts.receive(body)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"webhook not stored: {exc}", retry_after=5) from exc

    async def _relay(self, body: Any, raw: bytes, path_event: str | None) -> None:
        """Queue `raw`, byte for byte, in the outbox for the instance's relay URL (if any);
        a body that came on a by-event path goes to the same path under the relay URL."""
        fields = body if isinstance(body, dict) else {}
        instance = fields.get("instance") if isinstance(fields.get("instance"), str) else None
        url = self.settings.relay_for(instance)
        if url is None:
            return
        event = fields.get("event") if isinstance(fields.get("event"), str) else None
        if path_event and _PATH_SEGMENT.fullmatch(path_event) and path_event.strip("."):
            url = url.rstrip("/") + "/" + path_event
        now = clock.now()
        await self.committer.write_soon(
            lambda cur: ledger_callbacks.relay_in(
                cur, instance, event or path_event or "webhook", url, raw, now
            )
        )

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

    # -- callbacks --------------------------------------------------------------------------

    async def callbacks(
        self,
        *,
        state: str | None = None,
        since: float | None = None,
        task_id: str | None = None,
        endpoints: frozenset[str] | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[CallbackRow]:
        """Callbacks newest first (`endpoints`: only these endpoints')."""
        return await asyncio.to_thread(
            ledger_callbacks.listing,
            self.store,
            state=state,
            since=since,
            message_id=task_id,
            endpoints=endpoints,
            before_id=before,
            limit=limit,
        )

    async def callback(
        self, callback_id: int, endpoints: frozenset[str] | None = None
    ) -> CallbackRow:
        """One callback; NotFound when unknown (or not one of `endpoints`')."""
        row = await asyncio.to_thread(ledger_callbacks.get, self.store, callback_id)
        if row is None or (endpoints is not None and row.endpoint not in endpoints):
            raise NotFound(f"no callback with id {callback_id} - see GET /callbacks")
        return row

    async def retry_callbacks(self, ids: Sequence[int]) -> list[int]:
        """Send these callbacks again now; the ids queued (a forwarded relay cannot be)."""
        return await asyncio.to_thread(ledger_callbacks.retry, self.store, ids, clock.now())

    async def callback_endpoints(self) -> list[tuple[Endpoint, int]]:
        """Each endpoint with its pending callbacks."""

        def run() -> list[tuple[Endpoint, int]]:
            pending = ledger_callbacks.pending_by_endpoint(self.store)
            return [
                (endpoint, pending.get(endpoint.name, 0))
                for endpoint in ledger_callbacks.endpoints(self.store, clock.now())
            ]

        return await asyncio.to_thread(run)

    async def enable_endpoint(self, name: str) -> None:
        """Re-enable an endpoint a 410 disabled; NotFound when there is none by that name."""
        if not await asyncio.to_thread(ledger_callbacks.enable, self.store, name):
            raise NotFound(f"no callback endpoint named {name!r} - see GET /callbacks/endpoints")

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
        replica = None if self.replication is None else self.replication()
        if replica is not None and replica.state in ("failing", "restarting"):
            degraded.append(replica_problem(replica))
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
            replication=replica,
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


def replica_problem(replica: ReplicationView) -> str:
    """The /health problem line of a replication that is not keeping up."""
    lag = "" if replica.lag_seconds is None else f", {replica.lag_seconds:g}s behind"
    why = f": {replica.last_error}" if replica.last_error else ""
    return f"replication to {replica.replica} is {replica.state}{lag}{why}"


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
