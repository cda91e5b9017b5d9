"""Who may call the API: tokens, browsers (Origin, Content-Type, CORS) and the bind address.

Both middlewares sit inside `api.errors_middleware`, so each refusal has the one error shape.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from evomsgd.config import Settings
from evomsgd.errors import ApiError, ConfigError
from evomsgd.ledger.records import TokenRow
from evomsgd.ledger.tokens import TokenCache, match

log = logging.getLogger("evomsgd.guards")

TOKENS = web.AppKey("tokens", TokenCache)
TOKEN = web.RequestKey("token", TokenRow)  # the token a request authenticated with
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The one unsafe method a web page can send cross-site without a CORS preflight (an HTML form,
# fetch in no-cors mode), and never with Content-Type: application/json. DELETE always needs a
# preflight, which only configured origins pass, so it needs no Content-Type.
FORM_METHODS = frozenset({"POST"})
# Open without a token even when tokens exist: liveness, the API description, and the
# dashboard's files (the page holds no data; it asks for a token and sends it on every call).
_PUBLIC_PATHS = frozenset({"/", "/openapi.json", "/docs", "/dashboard"})
_PUBLIC_PREFIXES = ("/docs/", "/dashboard/static/")
_CHALLENGE = 'Bearer realm="evomsgd"'
NO_TOKEN = (
    "this request needs an API token - send Authorization: Bearer <token> "
    "(CLI: --token or EVOMSGD_TOKEN; an operator creates one with `evomsgd token create NAME`)"
)
BAD_TOKEN = (
    "the API token is not valid (mistyped or revoked) - check EVOMSGD_TOKEN, "
    "or create a new one with `evomsgd token create NAME`"
)
_CORS_METHODS = "GET, POST, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
_CORS_EXPOSE = "Retry-After, Idempotent-Replayed, WWW-Authenticate"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, tokens: int) -> None:
    """Refuse to listen beyond this machine without tokens unless --insecure-no-auth says so."""
    if tokens or is_loopback(settings.host):
        return
    where = f"{settings.host or '*'}:{settings.port}"
    if not settings.insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {where} without API tokens: anyone who can reach it could "
            "send WhatsApp messages from your number - create a token (`evomsgd token create "
            "NAME`), or listen on 127.0.0.1 (EVOMSGD_HOST), or pass --insecure-no-auth if a "
            "proxy in front of evomsgd authenticates every request"
        )
    log.warning(
        "INSECURE: listening on %s with no API tokens (--insecure-no-auth): anyone who can "
        "reach this address can send WhatsApp messages from your number",
        where,
    )


def _routed(request: web.Request) -> bool:
    """False for 404/405 requests: let the router's own error answer them."""
    return request.match_info.http_exception is None


def is_public(method: str, path: str) -> bool:
    """True when `method path` needs no token even while tokens exist."""
    if method not in SAFE_METHODS:
        return False
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


# Evolution's webhooks: a server-to-server POST that carries the webhook secret instead of an
# API token (web/webhooks.py checks it) and is addressed to EVOMSGD_PUBLIC_URL, which may be a
# domain name: neither the token nor the Host check applies. The Origin and Content-Type checks
# still do: Evolution sends no Origin and always JSON.
WEBHOOK_PREFIX = "/webhooks/evolution"


def is_webhook(path: str) -> bool:
    """True for the paths Evolution's webhooks are posted to."""
    return path == WEBHOOK_PREFIX or path.startswith(WEBHOOK_PREFIX + "/")


def _origin(value: str) -> str:
    return value.strip().rstrip("/").lower()


def _same_origin(origin: str, host: str) -> bool:
    try:
        return urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


def browser_middleware(settings: Settings) -> Middleware:
    """Preflights for configured origins; POST only as JSON; no unsafe method from a foreign site."""
    allowed = frozenset(settings.cors_origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        configured = origin is not None and _origin(origin) in allowed
        if (
            request.method == "OPTIONS"
            and configured
            and "Access-Control-Request-Method" in request.headers
        ):
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": _CORS_METHODS,
                    "Access-Control-Allow-Headers": _CORS_HEADERS,
                    "Access-Control-Max-Age": "600",
                },
            )
        if request.method not in SAFE_METHODS and _routed(request):
            if origin is not None and not configured and not _same_origin(origin, request.host):
                raise ApiError(
                    403,
                    "forbidden_origin",
                    f"requests from web pages at {origin} are refused - add that origin to "
                    "EVOMSGD_CORS_ORIGINS if it should call evomsgd",
                )
            if request.content_type == "multipart/form-data" and request.path in MULTIPART_PATHS:
                if not _not_a_form(request, configured):
                    raise ApiError(
                        403,
                        "forbidden_form",
                        "a multipart POST from a browser needs Authorization: Bearer <token> "
                        "(any token when evomsgd has none), or to come from a page on an origin in "
                        "EVOMSGD_CORS_ORIGINS - it is what keeps web pages from posting forms "
                        "to evomsgd",
                    )
            elif request.method in FORM_METHODS and request.content_type != "application/json":
                given = request.headers.get("Content-Type") or "none"
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"{request.method} needs the header Content-Type: application/json, even "
                    f"without a body (got {given}) - it is what keeps web pages from posting "
                    "forms to evomsgd",
                )
        return await handler(request)

    return middleware


# POST /messages also takes multipart/form-data (`curl -F file=@invoice.pdf`), which an HTML form
# can send cross-site without a preflight: only when no form could have sent it (`_not_a_form`).
MULTIPART_PATHS = frozenset({"/messages"})


def _not_a_form(request: web.Request, configured: bool) -> bool:
    """True for a multipart POST that no other site's form can have sent: it carries an
    Authorization header (a form cannot set one; auth_middleware checks the token when tokens
    exist), or an Origin that is allowed or this daemon's own, or no sign of a browser at all.

    A form is always posted by a browser, and every browser, old ones that send no Origin
    included, names itself `Mozilla/...` in User-Agent, which a page cannot change; modern ones
    add Sec-Fetch-* too. `curl -F`, HTTP libraries and the CLI send neither, so they need no
    header on a daemon without tokens."""
    headers = request.headers
    if "Authorization" in headers:
        return True
    origin = headers.get("Origin")
    if origin is not None:
        return configured or _same_origin(origin, request.host)
    if "Sec-Fetch-Site" in headers or "Sec-Fetch-Mode" in headers:
        return False
    return not headers.get("User-Agent", "").startswith("Mozilla/")


def cors_headers(
    settings: Settings,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An on_response_prepare hook: CORS headers for configured origins, errors included."""
    allowed = frozenset(settings.cors_origins)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and _origin(origin) in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE
        if allowed:
            response.headers.add("Vary", "Origin")

    return add


def auth_middleware(settings: Settings) -> Middleware:
    """With tokens: every non-public request needs a valid Bearer token. Without: local Hosts only."""
    origin_hosts = frozenset(urlsplit(origin).netloc for origin in settings.cors_origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_webhook(request.path) and _routed(request):
            return await handler(request)
        rows = await request.app[TOKENS].rows()
        if not rows:
            if not settings.insecure_no_auth:
                _check_host(request, origin_hosts)
            return await handler(request)
        if is_public(request.method, request.path):
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "unauthorized", NO_TOKEN, headers={"WWW-Authenticate": _CHALLENGE})
        row = match(rows, presented)
        if row is None:
            raise ApiError(
                401,
                "unauthorized",
                BAD_TOKEN,
                headers={"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'},
            )
        request[TOKEN] = row
        return await handler(request)

    return middleware


def _check_host(request: web.Request, origin_hosts: frozenset[str]) -> None:
    """Without tokens, answer only requests addressed to an IP or localhost.

    A web page can point its own domain name at 127.0.0.1 (DNS rebinding) and then call the API
    as a same-origin page; such requests carry that domain in Host.
    """
    host = request.host
    if not _host_allowed(host, origin_hosts):
        raise ApiError(
            403,
            "forbidden_host",
            f"Host {host!r} is refused: without API tokens evomsgd answers only requests for "
            "localhost or an IP address (this stops DNS-rebinding web pages) - create a token "
            "(`evomsgd token create NAME`) or list the site in EVOMSGD_CORS_ORIGINS",
        )


@functools.lru_cache(maxsize=256)  # clients send the same few Host values; bounded against floods
def _host_allowed(host: str, origin_hosts: frozenset[str]) -> bool:
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:  # a malformed Host such as "[::1"
        name = ""
    if name == "localhost" or host.lower() in origin_hosts:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def require_instance(request: web.Request, instance: str) -> None:
    """403 unless the request's token may use `instance` (tokens without a scope may use any)."""
    token = request.get(TOKEN)
    if token is not None and token.instances and instance not in token.instances:
        raise ApiError(
            403,
            "forbidden_instance",
            f"token {token.name!r} may use only {', '.join(token.instances)}, "
            f"not {instance!r} - use a token made for {instance!r}",
        )


def token_name(request: web.Request) -> str | None:
    """The name of the token the request came with (None when tokens are not in use)."""
    token = request.get(TOKEN)
    return None if token is None else token.name


def token_callback(request: web.Request) -> bool:
    """True when the request's token has its own callback endpoint (token create --callback-url)."""
    token = request.get(TOKEN)
    return token is not None and token.callback


def scoped(request: web.Request) -> bool:
    """True when the request's token may use only some instances."""
    return scope(request) is not None


def scope(request: web.Request) -> frozenset[str] | None:
    """The instances the request's token may see and use; None when it may use any."""
    token = request.get(TOKEN)
    return frozenset(token.instances) if token is not None and token.instances else None
