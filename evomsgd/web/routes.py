"""The route table: each route's method, path and handler, and what the API document says of it.

Every web module declares its rows next to its handlers and adds them with `register`, which puts
them on aiohttp's router and in the app's table at once. /openapi.json is derived from that table
(`openapi.document`), so a JSON API route cannot be served without being described. Rows without
an `Operation` are the pages, files and Prometheus text around the API, left out of the document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from evomsgd.models import ErrorBody

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Answer:
    """One status an operation can answer with, and the model of its body (errors by default)."""

    status: int
    description: str
    model: type[BaseModel] = ErrorBody
    binary: bool = False  # the body is a file's bytes (its own Content-Type), not JSON


@dataclass(frozen=True)
class Param:
    """A query or header parameter (path parameters come from the path itself)."""

    name: str
    where: Literal["query", "header"]
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    """What /openapi.json says of a route: its own answers; the guards' answers are added to it."""

    id: str
    summary: str
    answers: tuple[Answer, ...]
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True


@dataclass(frozen=True)
class Route:
    """One row of the table. `operation` is None only for what is not JSON API."""

    method: str
    path: str
    handler: Handler
    operation: Operation | None


TABLE = web.AppKey("routes", list)  # list[Route], in the order they were registered


def register(app: web.Application, rows: Iterable[Route]) -> None:
    """Add `rows` to the app's router and to its table, from which /openapi.json is derived."""
    table: list[Route] = app.setdefault(TABLE, [])
    for row in rows:
        if row.method == "GET":
            app.router.add_get(row.path, row.handler)  # and HEAD, as aiohttp does for GET
        else:
            app.router.add_route(row.method, row.path, row.handler)
        table.append(row)


def table(app: web.Application) -> list[Route]:
    """The rows registered on `app`, in order."""
    rows: list[Route] = app.get(TABLE, [])
    return rows


# Answers several operations share, each written once.
MALFORMED_JSON = Answer(400, "Malformed JSON")
BODY_TIMEOUT = Answer(408, "The body did not arrive within EVOMSGD_IDLE_TIMEOUT")
BODY_TOO_LARGE = Answer(413, "Body over 64 KiB")
UNKNOWN_TASK = Answer(404, "Unknown task id")
BACKLOG_FULL = Answer(429, "Too many waiting messages on the instance")
