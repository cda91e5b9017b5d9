"""Pydantic models of the HTTP API: they validate requests and generate /openapi.json.

Why one module of about 600 lines: it is the API's whole wire vocabulary in one place - every
request and answer model, each a few declarative lines - which /openapi.json is generated from
and which reviewers of an API change read side by side. It holds no logic to split off.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from evomsgd.media import MediaKind


class Status(StrEnum):
    """A message's state in the ledger; the first five are the old Celery stack's names."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    SCHEDULED = "SCHEDULED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


WAITING = (Status.PENDING, Status.SCHEDULED, Status.RETRY)
FINAL = (Status.SUCCESS, Status.FAILURE, Status.CANCELED, Status.EXPIRED)


class Delivery(StrEnum):
    """What WhatsApp did with a sent message (from Evolution's receipts), apart from `status`."""

    ACCEPTED = "accepted"  # Evolution answered 201: handed to WhatsApp
    UNCONFIRMED = "unconfirmed"  # accepted, and no server ack within EVOMSGD_ACK_TIMEOUT
    SERVER_ACK = "server_ack"  # the WhatsApp server has it
    FAILED = "failed"  # Evolution reported status ERROR
    DELIVERED = "delivered"  # on the recipient's device
    READ = "read"
    PLAYED = "played"  # a voice note or video was played


# A delivery state only moves up this ladder; a late or repeated receipt changes nothing.
# `unconfirmed` is a label on `accepted` that any receipt replaces; `failed` beats a server ack
# but not a delivery: a receipt proving the message arrived is the stronger evidence.
DELIVERY_RANK: dict[Delivery, int] = {
    Delivery.ACCEPTED: 10,
    Delivery.UNCONFIRMED: 15,
    Delivery.SERVER_ACK: 20,
    Delivery.FAILED: 25,
    Delivery.DELIVERED: 30,
    Delivery.READ: 40,
    Delivery.PLAYED: 50,
}
# The delivery note of a message whose instance emits no receipts (EVOLUTION integration).
NO_RECEIPTS = "no receipts on this instance"
# The column holding when each step was reached (`accepted` is the message's finished_at).
DELIVERY_AT: dict[Delivery, str] = {
    Delivery.UNCONFIRMED: "unconfirmed_at",
    Delivery.SERVER_ACK: "server_ack_at",
    Delivery.FAILED: "delivery_failed_at",
    Delivery.DELIVERED: "delivered_at",
    Delivery.READ: "read_at",
    Delivery.PLAYED: "played_at",
}


class MediaIn(BaseModel):
    """`media` of POST /messages: a file by `url` or `base64` (multipart: the `file` part)."""

    model_config = ConfigDict(extra="ignore")

    type: MediaKind = Field(
        description="What WhatsApp shows it as; audio goes as a file, not a voice note."
    )
    url: str | None = Field(
        None,
        min_length=1,
        max_length=2084,
        description="An http(s) URL Evolution downloads (or evomsgd, with fetch).",
    )
    base64: str | None = Field(
        None, min_length=1, description="The file's bytes in standard base64, no data: prefix."
    )
    filename: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[^\x00-\x1f/\\]+$",
        description="File name shown to the recipient; derived from the mimetype when absent.",
    )
    mimetype: str | None = Field(
        None,
        max_length=255,
        pattern=r"^[A-Za-z0-9][\w.+-]*/[\w.+-]+$",
        description="Detected from the bytes (or the file name) when absent.",
    )
    caption: str | None = Field(
        None, min_length=1, description="Text under the media; `message` when absent."
    )
    fetch: bool | None = Field(
        None,
        description="url only: evomsgd downloads and stores the file when accepting the message "
        "(for links that expire); default EVOMSGD_MEDIA_FETCH.",
    )


class SendRequest(BaseModel):
    """Body of POST /messages; unknown fields are ignored so old clients keep working."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            # `message` may be left out only when `media` is there (its caption).
            "anyOf": [{"required": ["message"]}, {"required": ["media"]}],
            "examples": [
                {
                    "phone": "+5215512345678",
                    "message": "Hola Carlos",
                    "instance_name": "mi_instancia",
                }
            ],
        },
    )

    phone: str = Field(
        min_length=1,
        max_length=64,
        description="International number (+5215512345678), a local number when EVOMSGD_DEFAULT_REGION "
        "is set, or a WhatsApp JID (...@s.whatsapp.net, ...@g.us, ...@lid).",
    )
    message: str | None = Field(
        None,
        min_length=1,
        description="Text to send (at most EVOMSGD_MAX_TEXT_LENGTH characters); required unless "
        "`media` is given, then it is the caption.",
    )
    instance_name: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f/\\?#%]+$",
        description="Evolution instance; defaults to EVOLUTION_INSTANCE_NAME.",
    )
    priority: Literal["normal", "high"] = Field(
        "normal", description="high (one-time codes) goes ahead of normal messages on its instance."
    )
    send_at: AwareDatetime | None = Field(
        None, description="RFC 3339 time; the message stays SCHEDULED until then."
    )
    expires_in: float | None = Field(
        None,
        gt=0,
        le=30 * 86_400,
        description="Seconds after which an unsent message EXPIRES, counted from send_at (or now).",
    )
    expires_at: AwareDatetime | None = Field(
        None, description="RFC 3339 time after which an unsent message EXPIRES."
    )
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="Where this message's signed status callbacks go, instead of its token's or "
        "the default endpoint; only a URL under EVOMSGD_CALLBACK_ALLOWED (else 422).",
    )
    media: MediaIn | None = Field(
        None, description="A document, image, video or audio file to send (see MediaIn)."
    )


class Accepted(BaseModel):
    """202 answer to POST /messages (and 200 for an idempotent replay)."""

    success: bool = True
    message: str = Field(description="What happened, in words.")
    task_id: str = Field(description="Use it with GET /tasks/{task_id}.")
    status: Status = Field(description="The message's status now.")


class Attempt(BaseModel):
    """One entry of a message's history."""

    at: str = Field(description="RFC 3339 time.")
    event: str = Field(
        description="attempt, lookup, retry, recovered, canceled, requeued, expired ..."
    )
    attempt: int | None = Field(None, description="Attempt number for calls to Evolution.")
    outcome: str | None = Field(None, description="sent, transient, permanent, ambiguous, ...")
    http_status: int | None = None
    detail: str | None = Field(None, description="Reason in words.")


class TaskResult(BaseModel):
    """`result` of a task: what happened to it, Celery-style. A field that does not apply is absent."""

    success: bool | None = Field(
        None,
        description="true for SUCCESS; false for RETRY, FAILURE, EXPIRED and CANCELED; absent while "
        "a message waits without having failed.",
    )
    phone: str = Field(description="The number or JID sent to Evolution.")
    instance: str = Field(description="The Evolution instance it is sent through.")
    attempts: int = Field(description="Calls made to Evolution for this message.")
    recovered_after_crash: int | None = Field(
        None, description="Times it was re-queued after a crash or a lost lease."
    )
    possibly_duplicated: bool | None = Field(
        None, description="true when a send whose outcome was unknown was repeated."
    )
    evolution_key: str | None = Field(
        None, description="SUCCESS: Evolution's key.id (the WhatsApp message id)."
    )
    remote_jid: str | None = Field(None, description="SUCCESS: the JID Evolution used.")
    sent_at: str | None = Field(None, description="SUCCESS: when Evolution took it (RFC 3339).")
    sandbox: bool | None = Field(None, description="true when recorded in sandbox mode, not sent.")
    unconfirmed: bool | None = Field(
        None,
        description="true when WhatsApp took it but Evolution failed to store it (no key): never "
        "resent.",
    )
    note: str | None = Field(None, description="With unconfirmed: what Evolution said.")
    error: str | None = Field(
        None, description="RETRY and the failed final states: what went wrong, in words."
    )
    error_kind: str | None = Field(
        None, description="The error's class: transient, permanent, ambiguous, expired, ..."
    )
    next_attempt_at: str | None = Field(None, description="RETRY: when it is tried again.")
    waiting_because: str | None = Field(
        None,
        description="A waiting message whose instance is not sending: why (paused, not paired, "
        "rejected key, ...).",
    )

    # Unannotated on purpose: pydantic takes a return annotation as the serialization schema,
    # which would hide these fields from /openapi.json.
    @model_serializer(mode="wrap")
    def _present_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        """Fields that do not apply are left out, not sent as null."""
        return {k: v for k, v in handler(self).items() if v is not None}


class DeliveryView(BaseModel):
    """What WhatsApp did with a sent message, from Evolution's receipts (webhooks)."""

    state: Delivery = Field(
        description="accepted (Evolution took it) -> server_ack -> delivered -> read / played; "
        "failed (WhatsApp reported ERROR); unconfirmed (no server ack within "
        "EVOMSGD_ACK_TIMEOUT). Only moves forward."
    )
    accepted_at: str | None = Field(None, description="When Evolution answered 201 (RFC 3339).")
    server_ack_at: str | None = Field(None, description="When the WhatsApp server acked it.")
    delivered_at: str | None = Field(None, description="When it reached the recipient's device.")
    read_at: str | None = Field(None, description="When the recipient read it.")
    played_at: str | None = Field(None, description="When a voice note or video was played.")
    failed_at: str | None = Field(None, description="When Evolution reported ERROR.")
    unconfirmed_at: str | None = Field(
        None, description="When it was marked unconfirmed (no server ack in time)."
    )
    error: str | None = Field(None, description="failed: what is known of the failure, in words.")
    note: str | None = Field(
        None,
        description=f'"{NO_RECEIPTS}" when the instance\'s Evolution integration (EVOLUTION) '
        "emits no receipts: the state stays accepted and is never marked unconfirmed.",
    )

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Steps not reached are left out, not sent as null."""
        return {k: v for k, v in handler(self).items() if v is not None}


class MediaView(BaseModel):
    """A task's media: what was (or will be) sent, and where to get the stored file."""

    type: str = Field(description="image, document, video or audio.")
    filename: str | None = Field(description="The file name sent to Evolution.")
    mimetype: str | None = Field(description="The mimetype sent to Evolution.")
    size: int | None = Field(description="Bytes of the stored file; null for a url medium.")
    sha256: str | None = Field(description="The stored file's SHA-256 (its name on disk).")
    url: str | None = Field(description="A url medium passed to Evolution (not stored).")
    download: str | None = Field(
        description="GET this path, with the same token, for the stored file; null for a url "
        "medium."
    )


class TaskView(BaseModel):
    """GET /tasks/{task_id}: the Celery-compatible trio plus the ledger's columns."""

    task_id: str
    status: Status
    result: TaskResult | None = Field(
        description="SUCCESS: {success, phone, evolution_key, remote_jid, ...}; "
        "RETRY/FAILURE/EXPIRED/CANCELED: {success: false, error, ...}; a waiting message whose "
        "instance is not sending: {waiting_because, ...}; otherwise null."
    )
    instance: str
    phone: str = Field(description="Normalised number or JID sent to Evolution.")
    phone_input: str = Field(description="The phone as the client sent it.")
    priority: Literal["normal", "high"]
    attempts: int = Field(description="Calls made to Evolution for this message.")
    created_at: str
    send_at: str | None
    next_attempt_at: str | None
    expires_at: str
    finished_at: str | None
    last_error: str | None
    sandbox: bool
    delivery: DeliveryView | None = Field(
        None,
        description="After a SUCCESS: what WhatsApp did with it (receipts); null before, in "
        "sandbox mode, and for messages sent before receipts existed.",
    )
    history: list[Attempt]
    media: MediaView | None = Field(
        None, description="The message's document, image, video or audio; null for a text."
    )


class TaskList(BaseModel):
    """GET /tasks: newest first, paginated with `before`."""

    tasks: list[TaskView]
    next_before: str | None = Field(
        description="Pass as ?before= to get the next page; null at the end."
    )


class ErrorDetail(BaseModel):
    field: str | None = Field(None, description="The offending field, when there is one.")
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. validation_error, not_found.")
    message: str = Field(description="What failed and what to do next.")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    success: Literal[False] = False
    error: ErrorInfo


class Root(BaseModel):
    """GET /: liveness."""

    status: Literal["ok"] = "ok"
    service: str = "evomsgd"
    version: str
    sandbox: bool


class QuietEnd(BaseModel):
    """When quiet hours end in one time zone for the messages they hold on an instance."""

    zone: str = Field(description="IANA time zone of the recipients, e.g. America/Mexico_City.")
    until: str = Field(description="When the window ends there (UTC, RFC 3339).")
    held: int = Field(description="Messages held until then.")


class LaneView(BaseModel):
    """One instance's lane, as /instances and /health show it."""

    instance: str
    state: str = Field(
        description="sending, idle, paused (by an operator), held (rate limit), or the blocking "
        "health: close, down, config_error, unknown_instance."
    )
    health: str = Field(
        description="What evomsgd believes of the instance: unknown (not probed yet), open, "
        "close, down, config_error, unknown_instance."
    )
    waiting: int
    in_flight: int
    next_send_at: str | None
    held_until: str | None
    paused_reason: str | None
    problem: str | None = Field(
        description="What stops the lane now; null while nothing does (last_error is history)."
    )
    last_error: str | None = Field(description="The latest error seen on the lane, however old.")
    last_error_at: str | None
    recovered_at: str | None = Field(
        description="When the lane sent (or probed open) again after last_error; null while "
        "the error lasts or if it never recovered."
    )
    send_interval: float
    send_jitter: float
    sent_today: int | None = Field(
        None,
        description="Sends started since UTC midnight; null when the lane has no daily cap.",
    )
    daily_cap: int | None = Field(
        None,
        description="Today's cap on sends: the warm-up's (never above per_day) while it warms "
        "up, else per_day (which counts a rolling 24 hours); null when none.",
    )
    warmup_day: int | None = Field(
        None,
        description="The day of its warm-up (1: the UTC day of its first send); null when it "
        "is not warming up.",
    )
    warmup_days: int | None = Field(None, description="Its warmup_days; null when off.")
    new_contacts_today: int | None = Field(
        None,
        description="Messages to recipients it never sent to, handed out since UTC midnight; "
        "null without a budget.",
    )
    new_contacts_per_day: int | None = Field(
        None, description="Its new-contact budget a UTC day; null when off."
    )
    quiet_hours: str | None = Field(
        None, description='Its quiet hours ("21:00-08:00", local to recipients); null when off.'
    )
    quiet_held: int | None = Field(
        None, description="Messages its quiet hours hold now; null when it has none configured."
    )
    quiet_ends: list[QuietEnd] = Field(
        default_factory=list,
        description="Per time zone, when quiet hours end for the messages they hold, earliest first.",
    )


class Lanes(BaseModel):
    """GET /instances."""

    instances: list[LaneView]


class PauseRequest(BaseModel):
    """Optional body of POST /instances/{instance}/pause."""

    reason: str | None = Field(None, description="Shown in /instances; first 200 characters.")


class Paused(BaseModel):
    """Answer of pause and resume."""

    instance: str
    paused: bool
    reason: str | None = None


class ReplicationView(BaseModel):
    """The ledger's replication by its supervised Litestream."""

    state: Literal["starting", "replicating", "failing", "restarting"] = Field(
        description="failing: Litestream reports errors since its last successful upload; "
        "restarting: Litestream died and is being restarted."
    )
    replica: str = Field(description="The replica URL, never its password.")
    litestream: str = Field(description="The Litestream executable in use.")
    pid: int | None = Field(description="Litestream's process id while it runs.")
    restarts: int = Field(description="Times Litestream died and was restarted since the start.")
    sync_interval_seconds: float
    last_sync_at: str | None = Field(description="The last successful upload to the replica.")
    lag_seconds: float | None = Field(
        description="0 when the replica holds the newest local transaction; else seconds since "
        "the last successful upload."
    )
    local_txid: int | None = Field(description="The ledger's newest transaction Litestream saw.")
    replica_txid: int | None = Field(description="The newest transaction on the replica.")
    last_error: str | None


class HealthView(BaseModel):
    """GET /health: 200 when the daemon can do its job, 503 otherwise."""

    status: Literal["ok", "degraded", "down"]
    version: str
    uptime_seconds: float
    sandbox: bool
    draining: bool
    evolution_url: str | None = Field(description="Never the key.")
    data_dir: str
    database_writable: bool
    workers_alive: int
    workers_configured: int
    counts: dict[str, int] = Field(description="Messages by status.")
    oldest_waiting_seconds: float | None
    instances: list[LaneView] = Field(
        description="Each instance lane: state, waiting, next send, last error."
    )
    last_error: dict[str, Any] | None = Field(
        None,
        description="The newest failed attempt, expiry or recovery: at, task_id, instance, error.",
    )
    problems: list[str]
    replication: ReplicationView | None = Field(
        None, description="The ledger's Litestream replica (EVOMSGD_REPLICA_URL); null when off."
    )


class EvolutionWebhook(BaseModel):
    """The envelope Evolution posts (its webhook): only these fields are read."""

    model_config = ConfigDict(extra="allow")

    event: str = Field(
        description="messages.update (receipts), connection.update, send.message; others "
        "are answered 200 and ignored."
    )
    instance: str = Field(description="The instance's name.")
    data: Any = Field(
        None,
        description="messages.update: {keyId, fromMe, status: SERVER_ACK|DELIVERY_ACK|READ|"
        "PLAYED|ERROR}; connection.update: {state: open|close|refused, statusReason}.",
    )


class WebhookAnswer(BaseModel):
    """What evomsgd did with a webhook (Evolution only looks at the status)."""

    success: bool = True
    outcome: str = Field(
        description="applied, stale (not a step forward), pending (its send's outcome is not "
        "recorded yet), dropped (not a message evomsgd sent), state, heard or ignored; "
        "comma-separated when a body carried several receipts."
    )


CALLBACK_EVENTS = (
    "message.sent",
    "message.failed",
    "message.expired",
    "message.canceled",
    "message.retrying",
    "message.delivered",
    "message.read",
    "message.delivery_failed",
    "message.unconfirmed",
    "instance.paused",
    "instance.resumed",
)


class CallbackView(BaseModel):
    """One callback in the outbox: an event for an app, or a relayed Evolution webhook."""

    id: int
    webhook_id: str = Field(description="The webhook-id header: the same on every retry.")
    kind: Literal["event", "relay"]
    type: str = Field(description="One of CALLBACK_EVENTS; for a relay, Evolution's event.")
    state: Literal["pending", "sent", "failed"] = Field(
        description="pending (to be sent, or retried at next_attempt_at), sent (a 2xx), failed "
        "(given up after EVOMSGD_CALLBACK_MAX_AGE, or 410 from a message's own URL)."
    )
    task_id: str | None = None
    instance: str | None = None
    endpoint: str | None = Field(None, description="default, or token:NAME; none for a relay.")
    occurred_at: str
    attempts: int
    next_attempt_at: str | None = None
    last_attempt_at: str | None = None
    last_status: int | None = Field(None, description="The receiver's last HTTP status.")
    last_error: str | None = None
    sent_at: str | None = None


class CallbackList(BaseModel):
    """GET /callbacks: newest first; pass next_before as `before` for the next page."""

    callbacks: list[CallbackView]
    next_before: int | None = None


class EndpointView(BaseModel):
    """A callback endpoint's health (never its secret)."""

    name: str
    url: str | None = Field(None, description="NULL: only messages with their own callback_url.")
    disabled_at: str | None = Field(
        None,
        description="It answered 410 Gone; re-enable with POST /callbacks/endpoints/{name}/enable.",
    )
    disabled_reason: str | None = None
    rotating: bool = Field(description="An old secret still signs alongside the new one.")
    last_ok_at: str | None = None
    last_error_at: str | None = None
    last_error: str | None = None
    pending: int = 0


class EndpointList(BaseModel):
    """GET /callbacks/endpoints."""

    endpoints: list[EndpointView]


class CallbackRetry(BaseModel):
    """POST /callbacks/retry and /callbacks/{id}/retry: the callbacks queued again."""

    retried: list[int]
