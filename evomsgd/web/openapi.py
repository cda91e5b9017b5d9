"""/openapi.json derived from the route table and the pydantic models that validate requests,
and /docs (offline)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from evomsgd import __version__
from evomsgd.models import ErrorBody
from evomsgd.web import guards, routes
from evomsgd.web.routes import Answer, Operation, Param, Route

_REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"\{([^}/]+)\}")

# Answers any operation may give, by the rules of guards.py and api.errors_middleware.
_FORBIDDEN = Answer(
    403,
    "Refused: a foreign Origin (POST/DELETE), a Host that is not localhost or an IP while no "
    "token exists, or an instance the token may not use",
)
_UNAUTHORIZED = Answer(401, "Tokens exist and this request has none, or an invalid one")
_NOT_JSON = Answer(415, "POST without Content-Type: application/json (needed even without a body)")
_UNAVAILABLE = Answer(503, "The ledger cannot be used right now, or the daemon is shutting down")
# Open without a token even when tokens exist (guards.is_public).
_PUBLIC: list[dict[str, list[str]]] = []
# A token when tokens exist; nothing while there are none.
_TOKEN: list[dict[str, list[str]]] = [{"bearer": []}, {}]
# Evolution's webhooks: the secret `evomsgd webhook setup` configured (header or path).
_WEBHOOK: list[dict[str, list[str]]] = [{"webhookSecret": []}]


def _ref(model: type) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _content(model: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _answer(answer: Answer) -> dict[str, Any]:
    if answer.binary:
        binary = {"schema": {"type": "string", "format": "binary"}}
        return {"description": answer.description, "content": {"*/*": binary}}
    return {"description": answer.description, "content": _content(answer.model)}


def _param(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": False,
        "description": param.description,
        "schema": dict(param.schema),
    }


def _path_params(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(path)
    ]


def _operation(route: Route, op: Operation) -> dict[str, Any]:
    """One operation: its own answers, then those the guards give every operation of its kind."""
    public = guards.is_public(route.method, route.path)
    webhook = guards.is_webhook(route.path)  # its own secret, its own 401 and 503
    common = [_FORBIDDEN]
    if not public and not webhook:
        common += [_UNAUTHORIZED, _UNAVAILABLE]
    if route.method in guards.FORM_METHODS:
        common.append(_NOT_JSON)
    responses = {str(a.status): _answer(a) for a in op.answers}
    # As before the table: a guard's answer is what a status means on every operation.
    responses |= {str(a.status): _answer(a) for a in common}
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.id,
        "security": _WEBHOOK if webhook else _PUBLIC if public else _TOKEN,
    }
    params = _path_params(route.path) + [_param(p) for p in op.params]
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": op.body_required, "content": _content(op.body)}
    doc["responses"] = responses
    return doc


@functools.cache
def _schemas(
    requests: tuple[type[BaseModel], ...], answers: tuple[type[BaseModel], ...]
) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in answers],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = defs["$defs"]
    return schemas


def document(table: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the table's operations."""
    paths: dict[str, dict[str, Any]] = {}
    requests: dict[type[BaseModel], None] = {}
    answers: dict[type[BaseModel], None] = {ErrorBody: None}
    for route in table:
        op = route.operation
        if op is None:
            continue
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, op)
        if op.body is not None:
            requests[op.body] = None
        answers.update(dict.fromkeys(a.model for a in op.answers))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "evomsgd",
            "version": __version__,
            "description": "Queue and deliver transactional WhatsApp messages through Evolution API.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(tuple(requests), tuple(answers)),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `evomsgd token create NAME`; needed once any "
                    "token exists.",
                },
                "webhookSecret": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-evomsgd-secret",
                    "description": "The secret `evomsgd webhook setup` configured in Evolution's "
                    "webhook headers (v1 servers: the path /webhooks/evolution/key/{secret}).",
                },
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
    """The document of the routes this app registered."""
    text = json.dumps(document(routes.table(request.app)))
    return web.Response(text=text, content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_HTML, content_type="text/html")


async def docs_init(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_INIT, content_type="application/javascript")


# The description and the page that renders it describe the API; they are not part of it.
ROUTES = (
    Route("GET", "/openapi.json", openapi_json, None),
    Route("GET", "/docs", docs, None),
    Route("GET", "/docs/init.js", docs_init, None),
)


def add_routes(app: web.Application) -> None:
    """Register /openapi.json, /docs and Swagger UI's files (shipped in the swagger-ui-bundle package)."""
    routes.register(app, ROUTES)
    app.router.add_static("/docs/static", _SWAGGER_DIR)
