"""HTTP handlers: parse, call the Service, render. One middleware turns every error into one shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel, ValidationError

from evomsgd import __version__, clock
from evomsgd.errors import ApiError, InvalidInput
from evomsgd.ledger.records import ListFilter
from evomsgd.log import log_fields
from evomsgd.models import (
    Accepted,
    Delivery,
    HealthView,
    Lanes,
    Paused,
    PauseRequest,
    Root,
    SendRequest,
    Status,
    TaskList,
    TaskView,
)
from evomsgd.service import Service
from evomsgd.web import routes
from evomsgd.web.errors import body_too_slow
from evomsgd.web.forms import MAX_TEXT_BODY, media_body_limit, read_form
from evomsgd.web.guards import require_instance, scope, scoped, token_callback, token_name
from evomsgd.web.routes import Answer, Operation, Param, Route
from evomsgd.web.views import task_list, task_view

log = logging.getLogger("evomsgd.api")

SERVICE = web.AppKey("service", Service)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LIST = 500


def _json(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=model.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


async def _read_json(request: web.Request) -> Any:
    return _decode_json(await _read_body(request))


async def _read_body(request: web.Request) -> bytes:
    timeout = request.app[SERVICE].settings.idle_timeout
    try:
        if request.content.is_eof():  # the whole body came with the headers: nothing to wait for
            raw = await request.read()
        else:
            # aiohttp bounds the headers (keepalive timer) but not a body that trickles in.
            async with asyncio.timeout(timeout):
                raw = await request.read()
    except TimeoutError:
        raise body_too_slow(timeout) from None
    return raw


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400, "invalid_json", f"request body is not valid JSON ({exc}) - send a JSON object"
        ) from None


def _parse_send_request(raw: bytes) -> SendRequest:
    try:
        return SendRequest.model_validate_json(raw)  # a valid body in one pass (pydantic-core)
    except ValidationError:
        return _send_request(_decode_json(raw))  # words what is wrong (and reads UTF-16/32)


def _media_request(raw: bytes) -> SendRequest:
    """A body over the text limit: a media request with its file in base64 (the one kind of
    JSON body allowed to be that large), or 413."""
    try:
        req = SendRequest.model_validate_json(raw)  # one parse: the file is megabytes
    except ValidationError:
        payload = None
        with contextlib.suppress(ValueError, RecursionError):
            payload = json.loads(raw)  # only to word what is wrong, when there is a file
        media = payload.get("media") if isinstance(payload, dict) else None
        if not (isinstance(media, dict) and isinstance(media.get("base64"), str)):
            raise _too_large(raw) from None
        return _send_request(payload)
    if req.media is None or req.media.base64 is None:
        raise _too_large(raw)
    return req


def _too_large(raw: bytes) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(max_size=MAX_TEXT_BODY, actual_size=len(raw))


def _send_request(payload: Any) -> SendRequest:
    if not isinstance(payload, dict):
        raise ApiError(
            422,
            "validation_error",
            "body must be a JSON object with phone and message",
            details=[{"field": None, "message": "expected a JSON object"}],
        )
    try:
        return SendRequest.model_validate(payload)
    except ValidationError as exc:
        invalid = _validation(exc)
        if payload.get("message") is None and payload.get("media") is None:
            # Optional only beside media (service.build's rule), so named with the others.
            invalid.details.append({"field": "message", "message": "Field required"})
            invalid = InvalidInput(invalid.details)
        raise invalid from None


def _validation(exc: ValidationError) -> InvalidInput:
    details = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or None
        details.append({"field": field, "message": err["msg"]})
    return InvalidInput(details)


# -- handlers -------------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    """Liveness."""
    service = request.app[SERVICE]
    return _json(Root(version=__version__, sandbox=service.settings.sandbox))


async def health(request: web.Request) -> web.Response:
    """Detailed state; 503 when the daemon cannot do its job."""
    view = await request.app[SERVICE].health(only=scope(request))
    return _json(view, status=503 if view.status == "down" else 200)


async def send_message(request: web.Request) -> web.Response:
    """Queue one message; 202 once it is on disk (its media file too)."""
    service = request.app[SERVICE]
    upload: bytes | None = None
    if request.content_type == "multipart/form-data":
        payload, upload = await read_form(request, service.settings)
        req = _send_request(payload)
    else:
        # A media request may carry its file in base64: read up to that size, then hold
        # every other body to the text limit.
        raw = await _read_body(request.clone(client_max_size=media_body_limit(service.settings)))
        if len(raw) > MAX_TEXT_BODY:  # megabytes of JSON: parsed in a thread, not on the loop
            req = await asyncio.to_thread(_media_request, raw)
        else:
            req = _parse_send_request(raw)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 200 and key.isprintable()):
        raise ApiError(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 printable characters"
        )
    new = service.build(
        req,
        idempotency_key=key,
        token_name=token_name(request),
        token_callback=token_callback(request),
        upload=upload is not None,
    )
    require_instance(request, new.instance)
    if new.media is not None:
        new = await service.store_media(new, req, upload)
    result = await service.accept(new)
    if result.outcome == "conflict":
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {key!r} was already used with a different "
            f"request (task {result.message_id}) - use a new key for a new message",
        )
    if result.outcome == "replayed":
        body = Accepted(
            message="Already accepted with this Idempotency-Key; nothing new was queued",
            task_id=result.message_id,
            status=result.status,
        )
        return _json(body, 200, {"Idempotent-Replayed": "true"})
    # DEBUG: at INFO a message logs one line, its outcome. Three lines per message would reach
    # journald's default rate limit (10,000 lines per 30 s per service) at ~110 messages/s and
    # then drop every line, warnings included.
    log.debug(
        "task %s instance %s: accepted (%s)",
        new.id,
        new.instance,
        result.status.value.lower(),
        extra=log_fields(new.id, new.instance),
    )
    text = (
        "Message scheduled" if result.status == Status.SCHEDULED else "Message queued for delivery"
    )
    return _json(Accepted(message=text, task_id=new.id, status=result.status), 202)


async def _task_in_scope(request: web.Request) -> str:
    """The path's task id, after checking that a scoped token may touch its instance."""
    task_id = request.match_info["task_id"]
    if scoped(request):
        require_instance(request, (await request.app[SERVICE].task(task_id)).message.instance)
    return task_id


async def get_task(request: web.Request) -> web.Response:
    """One task with its status, result and history."""
    return _json(task_view(await request.app[SERVICE].task(await _task_in_scope(request))))


async def task_media(request: web.Request) -> web.StreamResponse:
    """A task's stored media file, as a download; served by the daemon (never hot-linked)."""
    path, media = await request.app[SERVICE].media_file(await _task_in_scope(request))
    name = media.filename or path.name
    return web.FileResponse(
        path,
        headers={
            "Content-Type": media.mimetype or "application/octet-stream",
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
            # The bytes are a customer's file: never run as a page of this origin.
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )


async def list_tasks(request: web.Request) -> web.Response:
    """Messages newest first, filtered by status, instance, phone and time."""
    query = request.query
    statuses: list[Status] = []
    for raw in query.getall("status", []):
        for part in raw.split(","):
            if part.strip():
                try:
                    statuses.append(Status(part.strip().upper()))
                except ValueError:
                    raise ApiError(
                        422,
                        "validation_error",
                        f"status {part!r} is unknown; use one of "
                        f"{', '.join(s.value for s in Status)}",
                        details=[{"field": "status", "message": "unknown status"}],
                    ) from None
    try:
        limit = int(query.get("limit", "50"))
        before = int(query["before"]) if "before" in query else None
    except ValueError:
        raise ApiError(
            422,
            "validation_error",
            "limit and before must be integers",
            details=[{"field": "limit", "message": "must be an integer"}],
        ) from None
    if before is not None and not 0 <= before < 2**63:
        raise ApiError(
            422,
            "validation_error",
            "before must be a cursor from next_before",
            details=[{"field": "before", "message": "out of range"}],
        )
    if not 1 <= limit <= MAX_LIST:
        raise ApiError(
            422,
            "validation_error",
            f"limit must be between 1 and {MAX_LIST}",
            details=[{"field": "limit", "message": f"must be 1-{MAX_LIST}"}],
        )
    deliveries: list[str] = []
    for raw in query.getall("delivery", []):
        for part in raw.split(","):
            if part.strip():
                try:
                    deliveries.append(Delivery(part.strip().lower()).value)
                except ValueError:
                    raise ApiError(
                        422,
                        "validation_error",
                        f"delivery {part!r} is unknown; use one of "
                        f"{', '.join(d.value for d in Delivery)}",
                        details=[{"field": "delivery", "message": "unknown delivery state"}],
                    ) from None
    instance = query.get("instance")
    only = scope(request)
    if instance is not None:
        require_instance(request, instance)
    flt = ListFilter(
        statuses=tuple(statuses),
        instance=instance,
        instances=tuple(sorted(only)) if only is not None else (),
        phone=query.get("phone"),
        since=_time_param(query.get("since"), "since"),
        until=_time_param(query.get("until"), "until"),
        before_seq=before,
        limit=limit,
        deliveries=tuple(deliveries),
    )
    return _json(task_list(await request.app[SERVICE].tasks(flt)))


def _time_param(value: str | None, name: str) -> float | None:
    """RFC 3339, or a duration back from now: 90s, 30m, 1h, 7d."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if value[-1:] in units and value[:-1].isascii() and value[:-1].isdigit():
        ts: float | None = clock.now() - int(value[:-1]) * units[value[-1]]
    else:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        ts = parsed.timestamp() if parsed is not None and parsed.tzinfo is not None else None
    if ts is None or not clock.storable(ts):
        raise ApiError(
            422,
            "validation_error",
            f"{name} must be RFC 3339 with a zone (2026-11-27T10:00:00Z) or a "
            "duration like 30m, 1h, 7d",
            details=[{"field": name, "message": "invalid time"}],
        )
    return ts


async def cancel_task(request: web.Request) -> web.Response:
    """Cancel a message that has not been sent; 409 when too late."""
    return _json(task_view(await request.app[SERVICE].cancel(await _task_in_scope(request))))


async def retry_task(request: web.Request) -> web.Response:
    """Queue a failed, expired or canceled message again."""
    return _json(task_view(await request.app[SERVICE].retry(await _task_in_scope(request))), 202)


async def list_instances(request: web.Request) -> web.Response:
    """Each instance's lane."""
    return _json(Lanes(instances=request.app[SERVICE].lanes(only=scope(request))))


async def pause_instance(request: web.Request) -> web.Response:
    """Stop sending on one instance until resumed (messages keep waiting)."""
    instance = request.match_info["instance"]
    require_instance(request, instance)
    reason = "paused by an operator"
    if request.can_read_body:
        payload = await _read_json(request)
        if isinstance(payload, dict) and isinstance(payload.get("reason"), str):
            reason = payload["reason"][:200]
    await request.app[SERVICE].set_paused(instance, True, reason)
    log.warning("instance %s paused: %s", instance, reason, extra=log_fields(instance=instance))
    return _json(Paused(instance=instance, paused=True, reason=reason))


async def resume_instance(request: web.Request) -> web.Response:
    """Resume sending on one instance."""
    instance = request.match_info["instance"]
    require_instance(request, instance)
    await request.app[SERVICE].set_paused(instance, False, None)
    log.info("instance %s resumed by an operator", instance, extra=log_fields(instance=instance))
    return _json(Paused(instance=instance, paused=False))


_QUERY_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LIST}
_CURSOR = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_IDEMPOTENCY_KEY = {"type": "string", "minLength": 1, "maxLength": 200}

# The JSON API, in the order /openapi.json lists it.
API = (
    Route(
        "GET",
        "/",
        root,
        Operation("root", "Liveness", (Answer(200, "Up", Root),)),
    ),
    Route(
        "GET",
        "/health",
        health,
        Operation(
            "health",
            "Detailed health",
            (
                Answer(200, "Healthy or degraded", HealthView),
                Answer(503, "Cannot do its job", HealthView),
            ),
        ),
    ),
    Route(
        "POST",
        "/messages",
        send_message,
        Operation(
            "sendMessage",
            "Queue a message",
            (
                Answer(202, "Stored on disk; delivery follows", Accepted),
                Answer(200, "Idempotent replay: nothing new queued", Accepted),
                Answer(400, "Malformed JSON or header"),
                routes.BODY_TIMEOUT,
                Answer(409, "Idempotency-Key reused with a different body"),
                routes.BODY_TOO_LARGE,
                Answer(422, "Missing or invalid fields, each named"),
                routes.BACKLOG_FULL,
            ),
            params=(
                Param(
                    "Idempotency-Key",
                    "header",
                    "Same key and body within the TTL returns the original task.",
                    _IDEMPOTENCY_KEY,
                ),
            ),
            body=SendRequest,
        ),
    ),
    Route(
        "GET",
        "/tasks",
        list_tasks,
        Operation(
            "listTasks",
            "List tasks, newest first",
            (Answer(200, "A page", TaskList), Answer(422, "Invalid filter")),
            params=(
                Param("status", "query", "Comma-separated statuses, e.g. FAILURE,EXPIRED"),
                Param(
                    "delivery",
                    "query",
                    "Comma-separated delivery states: accepted, server_ack, delivered, read, "
                    "played, failed, unconfirmed",
                ),
                Param("instance", "query", "Instance name (a scoped token sees only its own)"),
                Param("phone", "query", "Normalised phone (E.164 digits) or JID"),
                Param("since", "query", "RFC 3339 time or a duration back from now (30m, 1h, 7d)"),
                Param("until", "query", "RFC 3339 time or a duration back from now"),
                Param("before", "query", "Cursor from next_before", _CURSOR),
                Param("limit", "query", f"Page size 1-{MAX_LIST} (default 50)", _QUERY_LIMIT),
            ),
        ),
    ),
    Route(
        "GET",
        "/tasks/{task_id}",
        get_task,
        Operation(
            "getTask",
            "Status, result and history of a task",
            (Answer(200, "The task", TaskView), routes.UNKNOWN_TASK),
        ),
    ),
    Route(
        "GET",
        "/tasks/{task_id}/media",
        task_media,
        Operation(
            "getTaskMedia",
            "The stored media file of a task (document, image, video, audio)",
            (
                Answer(200, "The file, with its mimetype and name", binary=True),
                Answer(404, "Unknown task, or it has no stored file"),
            ),
        ),
    ),
    Route(
        "DELETE",
        "/tasks/{task_id}",
        cancel_task,
        Operation(
            "cancelTask",
            "Cancel a message that has not been sent",
            (
                Answer(200, "Canceled", TaskView),
                routes.UNKNOWN_TASK,
                Answer(409, "Already being sent or finished"),
            ),
        ),
    ),
    Route(
        "POST",
        "/tasks/{task_id}/retry",
        retry_task,
        Operation(
            "retryTask",
            "Send a FAILURE, EXPIRED or CANCELED message again",
            (
                Answer(202, "Queued again", TaskView),
                routes.UNKNOWN_TASK,
                Answer(409, "Not in a retryable state"),
                routes.BACKLOG_FULL,
            ),
        ),
    ),
    Route(
        "GET",
        "/instances",
        list_instances,
        Operation(
            "listInstances",
            "Instance lanes",
            (Answer(200, "Each lane (a scoped token: its instances only)", Lanes),),
        ),
    ),
    Route(
        "POST",
        "/instances/{instance}/pause",
        pause_instance,
        Operation(
            "pauseInstance",
            "Pause sending on an instance",
            (
                Answer(200, "Paused", Paused),
                routes.MALFORMED_JSON,
                routes.BODY_TIMEOUT,
                routes.BODY_TOO_LARGE,
            ),
            body=PauseRequest,
            body_required=False,
        ),
    ),
    Route(
        "POST",
        "/instances/{instance}/resume",
        resume_instance,
        Operation(
            "resumeInstance", "Resume sending on an instance", (Answer(200, "Resumed", Paused),)
        ),
    ),
)


def add_routes(app: web.Application) -> None:
    """Register the JSON API."""
    routes.register(app, API)
