"""Presentation: the service's records as the API's wire models (GET /tasks, /tasks/{id})."""

from __future__ import annotations

from typing import Any

from evomsgd import clock
from evomsgd.evolution.outcomes import OutcomeKind
from evomsgd.ledger.records import CallbackRow, Endpoint, Message
from evomsgd.models import (
    FINAL,
    NO_RECEIPTS,
    WAITING,
    Attempt,
    CallbackView,
    Delivery,
    DeliveryView,
    EndpointView,
    MediaView,
    Status,
    TaskList,
    TaskResult,
    TaskView,
)
from evomsgd.service import TaskPage, TaskRecord

FOUND = OutcomeKind.FOUND.value


def task_list(page: TaskPage) -> TaskList:
    """GET /tasks: a page of views, newest first."""
    return TaskList(tasks=[task_view(r) for r in page.tasks], next_before=page.next_before)


def task_view(record: TaskRecord) -> TaskView:
    """The API's view of a ledger row (history omitted in lists); `waiting_because` says why its
    instance is not sending (paused, down, rejected key), which a message that never reached
    Evolution cannot know from its own row."""
    msg, history, waiting_because = record.message, record.history, record.waiting_because
    return TaskView(
        task_id=msg.id,
        status=msg.status,
        result=_result(msg, waiting_because),
        instance=msg.instance,
        phone=msg.phone,
        phone_input=msg.phone_input,
        priority="high" if msg.priority else "normal",
        attempts=msg.attempts,
        created_at=clock.db_to_rfc3339(msg.created_at) or "",
        send_at=clock.db_to_rfc3339(msg.send_at),
        next_attempt_at=clock.db_to_rfc3339(msg.next_attempt_at),
        expires_at=clock.db_to_rfc3339(msg.expires_at) or "",
        finished_at=clock.db_to_rfc3339(msg.finished_at),
        last_error=msg.last_error,
        sandbox=msg.sandbox,
        delivery=delivery_view(msg, no_receipts=record.no_receipts),
        history=[
            Attempt(
                at=clock.db_to_rfc3339(ev.at) or "",
                event=ev.event,
                attempt=ev.attempt,
                outcome=ev.outcome,
                http_status=ev.http_status,
                detail=ev.detail,
            )
            for ev in history or []
        ],
        media=media_view(msg),
    )


def media_view(msg: Message) -> MediaView | None:
    """A task's media, with the download route of a stored file."""
    media = msg.media
    if media is None:
        return None
    return MediaView(
        type=media.kind,
        filename=media.filename,
        mimetype=media.mimetype,
        size=media.size,
        sha256=media.sha256,
        url=media.url,
        download=f"/tasks/{msg.id}/media" if media.sha256 is not None else None,
    )


def _result(msg: Message, waiting_because: str | None = None) -> TaskResult | None:
    common: dict[str, Any] = {
        "phone": msg.phone,
        "instance": msg.instance,
        "attempts": msg.attempts,
        "recovered_after_crash": msg.recovered or None,
        # A look-up that found exactly one copy at Evolution settled the doubt (rules: FOUND).
        "possibly_duplicated": True if msg.ambiguous and msg.error_kind != FOUND else None,
    }
    if msg.status == Status.SUCCESS:
        unconfirmed = msg.error_kind == "sent_unconfirmed"
        return TaskResult(
            success=True,
            **common,
            evolution_key=msg.evolution_key,
            remote_jid=msg.remote_jid,
            sent_at=clock.db_to_rfc3339(msg.finished_at),
            sandbox=True if msg.sandbox else None,
            unconfirmed=True if unconfirmed else None,
            note=msg.last_error if unconfirmed else None,
        )
    if msg.status in FINAL:
        return TaskResult(
            success=False,
            **common,
            error=msg.last_error or msg.status.value.lower(),
            error_kind=msg.error_kind,
        )
    if msg.status == Status.RETRY:
        return TaskResult(
            success=False,
            **common,
            error=msg.last_error,
            error_kind=msg.error_kind,
            next_attempt_at=clock.db_to_rfc3339(msg.next_attempt_at),
            waiting_because=waiting_because,
        )
    if msg.status in WAITING and waiting_because:
        # Never attempted (or re-queued): nothing failed, so no error - only why it waits.
        return TaskResult(**common, waiting_because=waiting_because)
    return None


def delivery_view(msg: Message, *, no_receipts: bool = False) -> DeliveryView | None:
    """The delivery object of a sent message (None before it was sent, or in sandbox mode);
    `no_receipts`: its instance emits none, which the object says."""
    if msg.delivery is None:
        return None
    at = clock.db_to_rfc3339
    return DeliveryView(
        state=Delivery(msg.delivery),
        accepted_at=at(msg.finished_at),
        server_ack_at=at(msg.server_ack_at),
        delivered_at=at(msg.delivered_at),
        read_at=at(msg.read_at),
        played_at=at(msg.played_at),
        failed_at=at(msg.delivery_failed_at),
        unconfirmed_at=at(msg.unconfirmed_at),
        error=msg.delivery_error,
        note=NO_RECEIPTS if no_receipts else None,
    )


def callback_view(row: CallbackRow) -> CallbackView:
    """GET /callbacks: one outbox row (never its body: a relay's may carry an instance token)."""
    at = clock.db_to_rfc3339
    return CallbackView(
        id=row.id,
        webhook_id=row.webhook_id,
        kind="relay" if row.kind == "relay" else "event",
        type=row.type,
        state="sent" if row.state == "sent" else ("failed" if row.state == "failed" else "pending"),
        task_id=row.message_id,
        instance=row.instance,
        endpoint=row.endpoint,
        occurred_at=at(row.occurred_at) or "",
        attempts=row.attempts,
        next_attempt_at=at(row.next_attempt_at) if row.state == "pending" else None,
        last_attempt_at=at(row.last_attempt_at),
        last_status=row.last_status,
        last_error=row.last_error,
        sent_at=at(row.sent_at),
    )


def endpoint_view(endpoint: Endpoint, pending: int) -> EndpointView:
    """GET /callbacks/endpoints: an endpoint's health, never its secrets."""
    at = clock.db_to_rfc3339
    return EndpointView(
        name=endpoint.name,
        url=endpoint.url,
        disabled_at=at(endpoint.disabled_at),
        disabled_reason=endpoint.disabled_reason,
        rotating=len(endpoint.secrets) > 1,
        last_ok_at=at(endpoint.last_ok_at),
        last_error_at=at(endpoint.last_error_at),
        last_error=endpoint.last_error,
        pending=pending,
    )
