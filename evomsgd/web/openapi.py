"""/openapi.json built from the same pydantic models that validate requests, and /docs (offline)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from aiohttp import web
from pydantic.json_schema import models_json_schema

from evomsgd import __version__
from evomsgd.models import (
    Accepted,
    ErrorBody,
    HealthView,
    Lanes,
    Paused,
    PauseRequest,
    Root,
    SendRequest,
    TaskList,
    TaskView,
)

_REF = "#/components/schemas/{model}"
_MODELS = (
    SendRequest,
    PauseRequest,
    Accepted,
    TaskView,
    TaskList,
    ErrorBody,
    HealthView,
    Root,
    Lanes,
    Paused,
)


def _ref(model: type) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _content(model: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(ErrorBody)}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_INSTANCE = {"name": "instance", "in": "path", "required": True, "schema": {"type": "string"}}

# Answers any operation may give, by the rules of guards.py and api.errors_middleware.
_FORBIDDEN = _error(
    "Refused: a foreign Origin (POST/DELETE), a Host that is not localhost or an IP while no "
    "token exists, or an instance the token may not use"
)
_UNAUTHORIZED = _error("Tokens exist and this request has none, or an invalid one")
_NOT_JSON = _error("POST without Content-Type: application/json (needed even without a body)")
_UNAVAILABLE = _error("The ledger cannot be used right now, or the daemon is shutting down")
# Open without a token even when tokens exist (guards._PUBLIC_PATHS).
_PUBLIC: list[dict[str, list[str]]] = []
# A token when tokens exist; nothing while there are none.
_TOKEN: list[dict[str, list[str]]] = [{"bearer": []}, {}]


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _operation(
    op_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    public: bool = False,
    unsafe: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """One operation with the answers every operation of its kind may give."""
    common: dict[str, Any] = {"403": _FORBIDDEN}
    if not public:
        common |= {"401": _UNAUTHORIZED, "503": _UNAVAILABLE}
    if unsafe:
        common["415"] = _NOT_JSON
    return {
        "summary": summary,
        "operationId": op_id,
        "security": _PUBLIC if public else _TOKEN,
        **extra,
        "responses": {**responses, **common},
    }


@functools.cache
def spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    _, defs = models_json_schema(
        [
            (m, "validation" if m in (SendRequest, PauseRequest) else "serialization")
            for m in _MODELS
        ],
        ref_template=_REF,
    )
    paths: dict[str, Any] = {
        "/": {
            "get": _operation(
                "root",
                "Liveness",
                {"200": {"description": "Up", "content": _content(Root)}},
                public=True,
            )
        },
        "/health": {
            "get": _operation(
                "health",
                "Detailed health",
                {
                    "200": {"description": "Healthy or degraded", "content": _content(HealthView)},
                    "503": {"description": "Cannot do its job", "content": _content(HealthView)},
                },
            )
        },
        "/messages": {
            "post": _operation(
                "sendMessage",
                "Queue a message",
                {
                    "202": {
                        "description": "Stored on disk; delivery follows",
                        "content": _content(Accepted),
                    },
                    "200": {
                        "description": "Idempotent replay: nothing new queued",
                        "content": _content(Accepted),
                    },
                    "400": _error("Malformed JSON or header"),
                    "408": _error("The body did not arrive within EVOMSGD_IDLE_TIMEOUT"),
                    "409": _error("Idempotency-Key reused with a different body"),
                    "413": _error("Body over 64 KiB"),
                    "422": _error("Missing or invalid fields, each named"),
                    "429": _error("Too many waiting messages on the instance"),
                },
                unsafe=True,
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Same key and body within the TTL returns the original task.",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    }
                ],
                requestBody={"required": True, "content": _content(SendRequest)},
            )
        },
        "/tasks": {
            "get": _operation(
                "listTasks",
                "List tasks, newest first",
                {
                    "200": {"description": "A page", "content": _content(TaskList)},
                    "422": _error("Invalid filter"),
                },
                parameters=[
                    _query("status", "Comma-separated statuses, e.g. FAILURE,EXPIRED"),
                    _query("instance", "Instance name (a scoped token sees only its own)"),
                    _query("phone", "Normalised phone (E.164 digits) or JID"),
                    _query("since", "RFC 3339 time or a duration back from now (30m, 1h, 7d)"),
                    _query("until", "RFC 3339 time or a duration back from now"),
                    _query(
                        "before",
                        "Cursor from next_before",
                        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    ),
                    _query(
                        "limit",
                        "Page size 1-500 (default 50)",
                        {"type": "integer", "minimum": 1, "maximum": 500},
                    ),
                ],
            )
        },
        "/tasks/{task_id}": {
            "get": _operation(
                "getTask",
                "Status, result and history of a task",
                {
                    "200": {"description": "The task", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                },
                parameters=[_TASK_ID],
            ),
            "delete": _operation(
                "cancelTask",
                "Cancel a message that has not been sent",
                {
                    "200": {"description": "Canceled", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                    "409": _error("Already being sent or finished"),
                },
                parameters=[_TASK_ID],
            ),
        },
        "/tasks/{task_id}/retry": {
            "post": _operation(
                "retryTask",
                "Send a FAILURE, EXPIRED or CANCELED message again",
                {
                    "202": {"description": "Queued again", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                    "409": _error("Not in a retryable state"),
                    "429": _error("Too many waiting messages on the instance"),
                },
                unsafe=True,
                parameters=[_TASK_ID],
            )
        },
        "/instances": {
            "get": _operation(
                "listInstances",
                "Instance lanes",
                {
                    "200": {
                        "description": "Each lane (a scoped token: its instances only)",
                        "content": _content(Lanes),
                    }
                },
            )
        },
        "/instances/{instance}/pause": {
            "post": _operation(
                "pauseInstance",
                "Pause sending on an instance",
                {
                    "200": {"description": "Paused", "content": _content(Paused)},
                    "400": _error("Malformed JSON"),
                    "408": _error("The body did not arrive within EVOMSGD_IDLE_TIMEOUT"),
                    "413": _error("Body over 64 KiB"),
                },
                unsafe=True,
                parameters=[_INSTANCE],
                requestBody={"required": False, "content": _content(PauseRequest)},
            )
        },
        "/instances/{instance}/resume": {
            "post": _operation(
                "resumeInstance",
                "Resume sending on an instance",
                {"200": {"description": "Resumed", "content": _content(Paused)}},
                unsafe=True,
                parameters=[_INSTANCE],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "evomsgd",
            "version": __version__,
            "description": "Queue and deliver transactional WhatsApp messages through Evolution API.",
        },
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `evomsgd token create NAME`; needed once any "
                    "token exists.",
                }
            },
        },
    }


_SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)

_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>evomsgd API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""

# In a file of its own so a Content-Security-Policy without 'unsafe-inline' can serve the page.
_DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui', deepLinking: true});\n"


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(spec()), content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_HTML, content_type="text/html")


async def docs_init(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_INIT, content_type="application/javascript")


def add_routes(app: web.Application) -> None:
    """Register /openapi.json, /docs and Swagger UI's files (shipped in the swagger-ui-bundle package)."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/init.js", docs_init)
    app.router.add_static("/docs/static", _SWAGGER_DIR)
