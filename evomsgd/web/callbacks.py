"""The callbacks' routes: what the outbox holds, replaying it, and the endpoints' health.

A token with its own callback endpoint sees and replays only its own callbacks; other requests
(the operator's, or without tokens) see them all.
"""

from __future__ import annotations

from aiohttp import web

from evomsgd.errors import ApiError, NotFound
from evomsgd.ledger.callbacks import STATES, token_endpoint
from evomsgd.models import CallbackList, CallbackRetry, CallbackView, EndpointList, EndpointView
from evomsgd.web import routes
from evomsgd.web.api import MAX_LIST, SERVICE, _json, _time_param
from evomsgd.web.guards import token_callback, token_name
from evomsgd.web.routes import Answer, Operation, Param, Route
from evomsgd.web.views import callback_view, endpoint_view

UNKNOWN = Answer(404, "Unknown callback id")


def _scope(request: web.Request) -> frozenset[str] | None:
    """The endpoints a request may see: its token's own, or all (None)."""
    name = token_name(request)
    if name is not None and token_callback(request):
        return frozenset({token_endpoint(name)})
    return None


def _int(value: str | None, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ApiError(
            422,
            "validation_error",
            f"{name} must be an integer {low}-{high}",
            details=[{"field": name, "message": f"must be an integer {low}-{high}"}],
        )
    return int(value)


def _state(request: web.Request) -> str | None:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise ApiError(
            422,
            "validation_error",
            f"state {state!r} is unknown; use one of {', '.join(STATES)}",
            details=[{"field": "state", "message": "unknown state"}],
        )
    return state


def _id(request: web.Request) -> int:
    """The path's callback id; an id that cannot be one is unknown (404), as a task id is."""
    raw = request.match_info["callback_id"]
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) < 2**63):
        raise NotFound(f"no callback with id {raw!r} - see GET /callbacks")
    return int(raw)


async def list_callbacks(request: web.Request) -> web.Response:
    """Callbacks newest first, by state, time and task."""
    query = request.query
    limit = _int(query.get("limit"), "limit", 1, MAX_LIST) or 50
    rows = await request.app[SERVICE].callbacks(
        state=_state(request),
        since=_time_param(query.get("since"), "since"),
        task_id=query.get("task_id"),
        endpoints=_scope(request),
        before=_int(query.get("before"), "before", 1, 2**63 - 1),
        limit=limit,
    )
    more = len(rows) == limit
    return _json(
        CallbackList(
            callbacks=[callback_view(row) for row in rows],
            next_before=rows[-1].id if more and rows else None,
        )
    )


async def get_callback(request: web.Request) -> web.Response:
    """One callback: its event, state and last attempt."""
    row = await request.app[SERVICE].callback(_id(request), _scope(request))
    return _json(callback_view(row))


async def retry_callback(request: web.Request) -> web.Response:
    """Send one callback again now (sent ones too: a receiver that lost it)."""
    service = request.app[SERVICE]
    row = await service.callback(_id(request), _scope(request))
    retried = await service.retry_callbacks([row.id])
    if not retried:
        raise ApiError(
            409,
            "not_retryable",
            f"callback {row.id} is a relayed webhook already forwarded: its body was erased",
        )
    return _json(CallbackRetry(retried=retried), 202)


async def retry_callbacks(request: web.Request) -> web.Response:
    """Send again every callback that matches (default: failed ones), up to `limit`."""
    service = request.app[SERVICE]
    rows = await service.callbacks(
        state=_state(request) or "failed",
        since=_time_param(request.query.get("since"), "since"),
        task_id=request.query.get("task_id"),
        endpoints=_scope(request),
        limit=_int(request.query.get("limit"), "limit", 1, MAX_LIST) or MAX_LIST,
    )
    retried = await service.retry_callbacks([row.id for row in rows])
    return _json(CallbackRetry(retried=retried), 202)


async def list_endpoints(request: web.Request) -> web.Response:
    """Each callback endpoint's health (never its secret)."""
    only = _scope(request)
    endpoints = await request.app[SERVICE].callback_endpoints()
    return _json(
        EndpointList(
            endpoints=[
                endpoint_view(endpoint, pending)
                for endpoint, pending in endpoints
                if only is None or endpoint.name in only
            ]
        )
    )


async def enable_endpoint(request: web.Request) -> web.Response:
    """Re-enable an endpoint that answered 410 Gone; its waiting callbacks go at once."""
    name = request.match_info["name"]
    only = _scope(request)
    if only is not None and name not in only:
        raise ApiError(403, "forbidden_endpoint", f"this token may enable only {', '.join(only)}")
    service = request.app[SERVICE]
    await service.enable_endpoint(name)
    for endpoint, pending in await service.callback_endpoints():
        if endpoint.name == name:
            return _json(endpoint_view(endpoint, pending))
    raise ApiError(404, "not_found", f"no callback endpoint named {name!r}")


_FILTERS = (
    Param("state", "query", "pending, sent or failed"),
    Param("since", "query", "RFC 3339 time or a duration back from now (30m, 1h, 7d)"),
    Param("task_id", "query", "Only this task's callbacks"),
)
_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LIST}

ROUTES = (
    Route(
        "GET",
        "/callbacks",
        list_callbacks,
        Operation(
            "listCallbacks",
            "The callback outbox, newest first",
            (Answer(200, "A page", CallbackList), Answer(422, "Invalid filter")),
            params=(
                *_FILTERS,
                Param("before", "query", "Cursor from next_before", {"type": "integer"}),
                Param("limit", "query", f"Page size 1-{MAX_LIST} (default 50)", _LIMIT),
            ),
        ),
    ),
    Route(
        "POST",
        "/callbacks/retry",
        retry_callbacks,
        Operation(
            "retryCallbacks",
            "Send matching callbacks again (default: the failed ones)",
            (Answer(202, "Queued again", CallbackRetry), Answer(422, "Invalid filter")),
            params=(*_FILTERS, Param("limit", "query", f"At most 1-{MAX_LIST}", _LIMIT)),
        ),
    ),
    Route(
        "GET",
        "/callbacks/endpoints",
        list_endpoints,
        Operation(
            "listCallbackEndpoints",
            "Each callback endpoint's health",
            (Answer(200, "The endpoints", EndpointList),),
        ),
    ),
    Route(
        "POST",
        "/callbacks/endpoints/{name}/enable",
        enable_endpoint,
        Operation(
            "enableCallbackEndpoint",
            "Re-enable an endpoint disabled by a 410",
            (
                Answer(200, "Enabled", EndpointView),
                Answer(404, "Unknown endpoint"),
            ),
        ),
    ),
    Route(
        "GET",
        "/callbacks/{callback_id}",
        get_callback,
        Operation(
            "getCallback", "One callback", (Answer(200, "The callback", CallbackView), UNKNOWN)
        ),
    ),
    Route(
        "POST",
        "/callbacks/{callback_id}/retry",
        retry_callback,
        Operation(
            "retryCallback",
            "Send one callback again now",
            (
                Answer(202, "Queued again", CallbackRetry),
                UNKNOWN,
                Answer(409, "A forwarded relay: its body is gone"),
            ),
        ),
    ),
)


def add_routes(app: web.Application) -> None:
    """Register the callbacks' routes."""
    routes.register(app, ROUTES)
