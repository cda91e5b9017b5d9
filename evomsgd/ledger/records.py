"""The ledger's rows and the values passed to and from it: plain dataclasses, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from evomsgd.models import Status


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A message's media as the ledger holds it: a stored file (`sha256`) or a `url`."""

    kind: str  # image, document, video, audio
    mimetype: str | None
    filename: str | None
    sha256: str | None = None
    size: int | None = None
    url: str | None = None


@dataclass(slots=True)
class NewMessage:
    """A validated request, ready to be written."""

    id: str
    instance: str
    phone: str
    phone_input: str
    text: str
    priority: int
    created_at: float
    send_at: float | None
    expires_at: float
    sandbox: bool
    idempotency_key: str | None = None
    request_hash: str | None = None
    token_name: str | None = None
    # Migration 7: the callback endpoint resolved at accept time, and the request's own URL.
    callback_to: str | None = None
    callback_url: str | None = None
    media: MediaRef | None = None

    @property
    def status(self) -> Status:
        return (
            Status.SCHEDULED if self.send_at and self.send_at > self.created_at else Status.PENDING
        )


@dataclass(frozen=True, slots=True)
class InsertResult:
    """What happened to one NewMessage: created, replayed (same key and body) or conflict."""

    outcome: Literal["created", "replayed", "conflict"]
    message_id: str
    status: Status


@dataclass(slots=True)
class Message:
    """One row of `messages`."""

    seq: int
    id: str
    status: Status
    instance: str
    phone: str
    phone_input: str
    text: str | None
    priority: int
    created_at: str
    send_at: str | None
    next_attempt_at: str | None
    expires_at: str
    attempts: int
    retries_used: int
    ambiguous: int
    recovered: int
    lease_until: str | None
    started_at: str | None
    finished_at: str | None
    last_error: str | None
    error_kind: str | None
    evolution_key: str | None
    remote_jid: str | None
    sandbox: bool
    idempotency_key: str | None
    token_name: str | None
    # Migration 4: the delivery state and each step's time (models.Delivery, DELIVERY_AT).
    delivery: str | None = None
    server_ack_at: str | None = None
    delivered_at: str | None = None
    read_at: str | None = None
    played_at: str | None = None
    delivery_failed_at: str | None = None
    unconfirmed_at: str | None = None
    delivery_error: str | None = None
    # Migration 7: where its callbacks go (callback_endpoints.name) and its own URL, if any.
    callback_to: str | None = None
    callback_url: str | None = None
    # Migration 8: the media (records.MediaRef); NULL for a text.
    media_type: str | None = None
    media_sha256: str | None = None
    media_size: int | None = None
    media_mimetype: str | None = None
    media_filename: str | None = None
    media_url: str | None = None

    @property
    def media(self) -> MediaRef | None:
        """The message's media, None for a text."""
        if self.media_type is None:
            return None
        return MediaRef(
            self.media_type,
            self.media_mimetype,
            self.media_filename,
            self.media_sha256,
            self.media_size,
            self.media_url,
        )


@dataclass(frozen=True, slots=True)
class LookupFacts:
    """What looking an ambiguous send up in Evolution needs from the ledger."""

    since: float  # the earliest attempt that may have sent it started no earlier than this
    taken: frozenset[str]  # Evolution keys recorded for evomsgd's other messages to the recipient
    integration: str | None  # the instance's integration (lanes.integration), when known


@dataclass(frozen=True, slots=True)
class Event:
    """One row of `events`: a message's history."""

    at: str
    event: str
    attempt: int | None
    outcome: str | None
    http_status: int | None
    detail: str | None


@dataclass(slots=True)
class Transition:
    """The result of one attempt, written with its history event in one transaction."""

    status: Status
    outcome: str
    detail: str | None
    http_status: int | None = None
    next_attempt_at: float | None = None
    spend_retry: bool = False
    ambiguous: bool = False
    evolution_key: str | None = None
    remote_jid: str | None = None
    error_kind: str | None = None
    extra_events: list[tuple[str, str]] = field(default_factory=list)
    # What the look-up before this attempt found, in words: a `lookup` history row, before the
    # attempt's own (an attempt after an ambiguous one asks Evolution first).
    lookup: str | None = None
    # Remember the recipient as not on WhatsApp (for this instance) until then.
    not_on_whatsapp_until: float | None = None
    integration: str | None = None  # SENT: the instance's integration as its 201 showed it


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One row of `tokens`: a name, the token's SHA-256, the instances it may use (empty = all)."""

    name: str
    sha256: str
    instances: tuple[str, ...]
    created_at: str
    callback: bool = False  # it has its own callback endpoint (token create --callback-url)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long finished messages stay: days after `finished_at`; 0 keeps them, None never erases."""

    success_days: float
    failed_days: float
    erase_text_days: float | None = None


@dataclass(slots=True)
class PurgeReport:
    """What one purge removed (or, in a dry run, would remove)."""

    dry_run: bool
    success: int = 0  # SUCCESS messages deleted
    failed: int = 0  # FAILURE, EXPIRED and CANCELED messages deleted
    events: int = 0  # their history rows
    texts_erased: int = 0
    idempotency: int = 0  # expired Idempotency-Key rows
    media_files: int = 0  # media files no message uses any more (ledger/media.py)
    media_bytes: int = 0  # their size: what deleting them freed
    vacuum: str = "none"  # how the freed pages were handed back: none, incremental, full
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def removed(self) -> int:
        """Rows changed, all kinds together."""
        return (
            self.success
            + self.failed
            + self.events
            + self.texts_erased
            + self.idempotency
            + self.media_files
        )


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Filters of GET /tasks and `evomsgd tasks list`."""

    statuses: tuple[Status, ...] = ()
    instance: str | None = None
    instances: tuple[str, ...] = ()  # any of these (a scoped token's); empty = no restriction
    phone: str | None = None
    since: float | None = None
    until: float | None = None
    before_seq: int | None = None
    limit: int = 50
    deliveries: tuple[str, ...] = ()  # delivery states (models.Delivery values)


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery receipt from Evolution: which message (instance + key.id) reached which state."""

    instance: str
    evolution_key: str
    delivery: str  # a models.Delivery value
    at: float


@dataclass(frozen=True, slots=True)
class ReceiptResult:
    """What one receipt did: applied (the state moved), stale (no move), pending (the send's
    outcome is not recorded yet), or dropped (no such message of ours)."""

    outcome: Literal["applied", "stale", "pending", "dropped"]
    message_id: str | None = None
    delivery: str | None = None
    # failed receipts on the instance in the last 10 minutes, counted when this one failed
    recent_failures: int = 0
    # applied: seconds from the message's acceptance to this receipt (for the latency metrics)
    since_accepted: float | None = None


@dataclass(frozen=True, slots=True)
class CallbackRow:
    """One row of the `callbacks` outbox."""

    id: int
    webhook_id: str
    kind: str  # event, relay
    type: str
    key: str
    message_id: str | None
    instance: str | None
    endpoint: str | None
    url: str | None  # the row's own URL (a message's callback_url, a relay target)
    occurred_at: str
    data: str | None
    body: bytes | None
    state: str  # pending, sent, failed
    attempts: int
    failures: int
    next_attempt_at: str | None
    retry_from: str | None
    last_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    sent_at: str | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One row of `callback_endpoints`; `secrets` are those that sign now (the new one first)."""

    name: str
    url: str | None
    secrets: tuple[str, ...]
    disabled_at: str | None
    disabled_reason: str | None
    last_ok_at: str | None
    last_error_at: str | None
    last_error: str | None
    created_at: str


@dataclass(frozen=True, slots=True)
class Due:
    """A callback to attempt now: its row, where it goes and what signs it (no secrets: a relay)."""

    row: CallbackRow
    url: str | None
    secrets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """What one attempt did, for `callbacks.record_in`."""

    id: int
    at: float
    body: bytes | None  # the body sent (kept from the first attempt on)
    state: str  # pending (retry at next_attempt_at), sent, failed
    next_attempt_at: float | None
    status: int | None
    error: str | None
    disable: str | None = None  # 410 from the endpoint's own URL: why it is disabled
