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
from evomsgd.models import Accepted, ErrorBody, HealthView, Root, SendRequest, TaskList, TaskView

_REF = "#/components/schemas/{model}"
_MODELS = (SendRequest, Accepted, TaskView, TaskList, ErrorBody, HealthView, Root)


def _ref(model: type) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _content(model: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(ErrorBody)}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_INSTANCE = {"name": "instance", "in": "path", "required": True, "schema": {"type": "string"}}
_LANES = {
    "description": "Instance lanes",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


@functools.cache
def spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    _, defs = models_json_schema(
        [(m, "validation" if m is SendRequest else "serialization") for m in _MODELS],
        ref_template=_REF,
    )
    unavailable = _error("The ledger cannot be written right now, or the daemon is shutting down")
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "Liveness",
                "operationId": "root",
                "responses": {"200": {"description": "Up", "content": _content(Root)}},
            }
        },
        "/health": {
            "get": {
                "summary": "Detailed health",
                "operationId": "health",
                "responses": {
                    "200": {"description": "Healthy or degraded", "content": _content(HealthView)},
                    "503": {"description": "Cannot do its job", "content": _content(HealthView)},
                },
            }
        },
        "/messages": {
            "post": {
                "summary": "Queue a message",
                "operationId": "sendMessage",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Same key and body within the TTL returns the original task.",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    }
                ],
                "requestBody": {"required": True, "content": _content(SendRequest)},
                "responses": {
                    "202": {
                        "description": "Stored on disk; delivery follows",
                        "content": _content(Accepted),
                    },
                    "200": {
                        "description": "Idempotent replay: nothing new queued",
                        "content": _content(Accepted),
                    },
                    "400": _error("Malformed JSON or header"),
                    "409": _error("Idempotency-Key reused with a different body"),
                    "413": _error("Body too large"),
                    "422": _error("Missing or invalid fields, each named"),
                    "429": _error("Too many waiting messages on the instance"),
                    "503": unavailable,
                },
            }
        },
        "/tasks": {
            "get": {
                "summary": "List tasks, newest first",
                "operationId": "listTasks",
                "parameters": [
                    _query("status", "Comma-separated statuses, e.g. FAILURE,EXPIRED"),
                    _query("instance", "Instance name"),
                    _query("phone", "Normalised phone (E.164 digits) or JID"),
                    _query("since", "RFC 3339 time or a duration back from now (30m, 1h, 7d)"),
                    _query("until", "RFC 3339 time or a duration back from now"),
                    _query("before", "Cursor from next_before", {"type": "integer"}),
                    _query(
                        "limit",
                        "Page size 1-500 (default 50)",
                        {"type": "integer", "minimum": 1, "maximum": 500},
                    ),
                ],
                "responses": {
                    "200": {"description": "A page", "content": _content(TaskList)},
                    "422": _error("Invalid filter"),
                },
            }
        },
        "/tasks/{task_id}": {
            "get": {
                "summary": "Status, result and history of a task",
                "operationId": "getTask",
                "parameters": [_TASK_ID],
                "responses": {
                    "200": {"description": "The task", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                },
            },
            "delete": {
                "summary": "Cancel a message that has not been sent",
                "operationId": "cancelTask",
                "parameters": [_TASK_ID],
                "responses": {
                    "200": {"description": "Canceled", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                    "409": _error("Already being sent or finished"),
                },
            },
        },
        "/tasks/{task_id}/retry": {
            "post": {
                "summary": "Send a FAILURE, EXPIRED or CANCELED message again",
                "operationId": "retryTask",
                "parameters": [_TASK_ID],
                "responses": {
                    "202": {"description": "Queued again", "content": _content(TaskView)},
                    "404": _error("Unknown task id"),
                    "409": _error("Not in a retryable state"),
                },
            }
        },
        "/instances": {
            "get": {
                "summary": "Instance lanes",
                "operationId": "listInstances",
                "responses": {"200": _LANES},
            }
        },
        "/instances/{instance}/pause": {
            "post": {
                "summary": "Pause sending on an instance",
                "operationId": "pauseInstance",
                "parameters": [_INSTANCE],
                "responses": {"200": _LANES},
            }
        },
        "/instances/{instance}/resume": {
            "post": {
                "summary": "Resume sending on an instance",
                "operationId": "resumeInstance",
                "parameters": [_INSTANCE],
                "responses": {"200": _LANES},
            }
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
        "components": {"schemas": defs["$defs"]},
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
