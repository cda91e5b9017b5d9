"""The HTTP server around the app: connection limits, and the one error shape even for requests
that aiohttp's parser refuses before any handler or middleware runs."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from evomsgd.config import Settings
from evomsgd.web.errors import error_body

log = logging.getLogger("evomsgd.server")

MAX_LINE = 8190  # request line (method, URL, version): longer gets 400
MAX_FIELD = 8190  # one header line
MAX_HEADERS = 64


def http_limits(settings: Settings) -> dict[str, Any]:
    """aiohttp's per-connection limits, so slow or huge requests cannot exhaust the daemon."""
    return {
        # aiohttp starts this timer when a connection opens and after each response, and does
        # not restart it while headers trickle in: it bounds slow headers and idle connections.
        "keepalive_timeout": settings.idle_timeout,
        "max_line_size": MAX_LINE,
        "max_field_size": MAX_FIELD,
        "max_headers": MAX_HEADERS,
        # After an early answer (413, 408) read at most this long before closing the connection.
        "lingering_time": 2.0,
    }


_PROTOCOL_ERROR = (
    "the request is not valid HTTP or exceeds a limit (request line and each header at most "
    f"{MAX_LINE} bytes, at most {MAX_HEADERS} headers) - fix the client's request"
)


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers parser errors itself, in text/plain, and logs the offending bytes at ERROR
    (they may hold a token). Answer them in the one JSON shape and log only the error's kind."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.warning(
                "refused a malformed request from %s (%s)",
                request.remote,
                type(exc).__name__ if exc else status,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send an error after it")
        if status >= 500:
            response = error_body(status, "internal_error", "internal error - see the daemon's log")
        else:
            response = error_body(status, "bad_request", _PROTOCOL_ERROR)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner whose connections answer protocol errors in the one JSON error shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Only __call__ differs, so the server aiohttp built is reused as it is (aiohttp is pinned).
        server.__class__ = _JsonErrorServer
        return server
