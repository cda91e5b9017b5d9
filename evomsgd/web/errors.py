"""The one JSON error shape, and the one table from domain errors to HTTP statuses.

Every failure of every route leaves through `errors_middleware`: the service's domain errors by
`STATUS`, the web room's own `ApiError`s as they are, aiohttp's HTTP exceptions with our wording,
and anything else as a 500 that names no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from evomsgd.errors import (
    ApiError,
    Backpressure,
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    ShuttingDown,
    StoreUnavailable,
    TooLarge,
)
from evomsgd.models import ErrorBody, ErrorDetail, ErrorInfo

log = logging.getLogger("evomsgd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Domain error -> HTTP status. Looked up along the class's MRO, so a subclass maps like its base.
STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidInput: 422,
    Backpressure: 429,
    ShuttingDown: 503,
    StoreUnavailable: 503,
    TooLarge: 413,
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def body_too_slow(timeout: float) -> ApiError:
    """The 408 for a request body that trickles in past EVOMSGD_IDLE_TIMEOUT (JSON or multipart)."""
    return ApiError(
        408,
        "request_timeout",
        f"the request body did not arrive within {timeout:g}s (EVOMSGD_IDLE_TIMEOUT)",
    )


def error_body(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> web.Response:
    """The one error shape: {"success": false, "error": {"code", "message", "details"}}."""
    body = ErrorBody(
        error=ErrorInfo(
            code=code, message=message, details=[ErrorDetail(**d) for d in details or []]
        )
    )
    return web.Response(status=status, body=body.model_dump_json(), content_type="application/json")


def status_of(exc: DomainError) -> int:
    """The HTTP status a domain error answers with."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def domain_response(exc: DomainError) -> web.Response:
    """A domain error in the one shape, with Retry-After when trying later can work."""
    message = exc.message
    if isinstance(exc, StoreUnavailable):
        message = f"{message} - retry later"
    details = exc.details if isinstance(exc, InvalidInput) else None
    response = error_body(status_of(exc), exc.code, message, details)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate every failure to the one JSON error shape; never leak internals or secrets."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_body(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response
    except DomainError as exc:
        return domain_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = {
            404: f"no route {request.method} {request.path} - see GET /docs for the API",
            405: f"{request.method} is not allowed on {request.path}",
            413: "request body is too large",
        }.get(exc.status, exc.reason)
        response = error_body(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_body(500, "internal_error", "internal error - see the daemon's log")
