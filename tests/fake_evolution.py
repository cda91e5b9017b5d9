"""A fake Evolution API: a real aiohttp server speaking the contract in shared/evolution-api.md.

In pytest:

    async with FakeEvolution(api_key="k", instances=["main"]) as fake:
        fake.script(number="5511000000001", responses=[Fault.RATE_LIMIT, Fault.OK])
        ...  # point the code under test at fake.url
        await fake.wait_for_sends(2)
        assert [r.fault for r in fake.received] == [Fault.RATE_LIMIT, Fault.OK]

As a process, for end-to-end runs (prints `READY <port>` once listening, stops on SIGTERM):

    python tests/fake_evolution.py --port 0 --api-key k --instances a,b --state b=close

and is driven over HTTP on the same port: `GET /_fake/received`, `POST /_fake/script`
`{"number": "...", "responses": ["rate_limit", "ok"]}`, `POST /_fake/state {"instance", "state"}`,
`POST /_fake/down {"seconds": 2}`, `POST /_fake/release`, `POST /_fake/reset`,
`POST /_fake/event {"instance", "event", "data"}` (posts it to the instance's webhook), and
`GET /_fake/count` (how many sends arrived and were answered, cheap enough to poll).
`--any-instance` makes every instance name exist (open), for runs with many instances.

Webhooks: `webhook/set` stores one row per instance (`webhook/find` returns it, or null); after a
delivered send the fake posts `send.message` and then a `messages.update` per status in
`auto_receipts` to it, with the configured headers (`receipts_first`: before the 201). `receipt()`
and `connection_update()` post one event; `findStatusMessage` answers the receipts posted;
`findMessages` answers from the sends delivered (`stored`), DROP and HANG included.

What answers a send: a fault scripted for that number, else one scripted for any number, else
what the real server would do (schema and blank-text checks, numbers marked not on WhatsApp,
the instance's state), else `default_fault` (OK).

Like Node's http server, an idle keep-alive connection is closed after `idle_close` seconds
(Node's `server.keepAliveTimeout`, 5 s by default); connections and requests are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import re
import secrets
import signal
import socket
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web


class Fault(enum.StrEnum):
    """One row of the contract's answer table, forced on a send."""

    OK = "ok"  # 201, full v2 body (v1 body on a v1 fake)
    OK_MINIMAL = "ok_minimal"  # 201 like an EVOLUTION-integration instance: UUID id, raw jid
    OK_NO_KEY = "ok_no_key"  # 201 without `key`: delivered, but unprovable
    UNAUTHORIZED = "unauthorized"  # 401 "Unauthorized"
    UNKNOWN_INSTANCE = "unknown_instance"  # 404 ['The "X" instance does not exist']
    WRONG_PATH = "wrong_path"  # 404 ["Cannot POST /..."]
    LICENSE = "license"  # 503 top-level code LICENSE_REQUIRED (2.4 rc)
    CORS = "cors"  # 500 "Not allowed by CORS"
    SCHEMA = "schema"  # 400 [['instance requires property "text"']]
    V1_SCHEMA = "v1_schema"  # 400 'instance requires property "textMessage"' (a v1 server)
    BLANK_TEXT = "blank_text"  # 400 ["Text is required"]
    MALFORMED_JSON = "malformed_json"  # 400 string message, error "Internal Server Error"
    NOT_ON_WHATSAPP = "not_on_whatsapp"  # 400 [{"jid", "exists": false, "number"}]
    CONNECTION_CLOSED = "connection_closed"  # 400 ["Error: Connection Closed"]
    TIMED_OUT = "timed_out"  # 400 ["Error: Timed Out"]
    SESSION_ERROR = "session_error"  # 400 ["SessionError: No sessions"]
    RATE_LIMIT = "rate_limit"  # 400 ["Error: rate-overlimit"]
    PRISMA = "prisma"  # 400 "PrismaClient..." - the message WAS delivered
    NOT_PAIRED = "not_paired"  # 500 reading 'onWhatsApp'
    LOADING = "loading"  # 500 reading 'textMessage'
    CONNECTION_CLOSED_500 = "connection_closed_500"  # 500 "Connection Closed"
    TIMED_OUT_500 = "timed_out_500"  # 500 "Timed Out"
    SERVER_ERROR = "server_error"  # 500, unrecognised message
    BAD_GATEWAY = "bad_gateway"  # 502 from a proxy (HTML)
    UNAVAILABLE = "unavailable"  # 503 from a proxy (HTML)
    GATEWAY_TIMEOUT = "gateway_timeout"  # 504 from a proxy (HTML)
    HANG = "hang"  # delivered, then no answer until release() or hang_seconds; then 201
    DROP = "drop"  # delivered, then the connection is closed without an answer
    # sendMedia (shared/evolution-api.md, Send media)
    MEDIA_SCHEMA = "media_schema"  # 400 [['instance requires property "mediatype"']] (v2)
    V1_MEDIA_SCHEMA = "v1_media_schema"  # 400 [['... "mediaMessage"']] (a v1 server)
    MEDIA_NULL_CAPTION = "media_null_caption"  # 400 [["caption is not of a type(s) string"]]
    V1_EMPTY_CAPTION = "v1_empty_caption"  # 400 [['The "caption" cannot be empty']] (v1)
    MEDIA_NOT_URL_OR_BASE64 = "media_not_url_or_base64"  # 400 ["Owned media must be ..."]
    MEDIA_NO_FILENAME = "media_no_filename"  # 400 ["For base64 the file name must be informed."]
    MEDIA_UPLOAD_FAILED = "media_upload_failed"  # 500 ["Error: Media upload failed on all hosts"]
    MEDIA_NOT_PAIRED = "media_not_paired"  # 500 [... (reading 'waUploadToServer')]


# Faults after which WhatsApp has the message, whatever the client was told.
DELIVERS = frozenset(
    {Fault.OK, Fault.OK_MINIMAL, Fault.OK_NO_KEY, Fault.PRISMA, Fault.HANG, Fault.DROP}
)

_PROXY_PAGES = {
    Fault.BAD_GATEWAY: (502, "502 Bad Gateway"),
    Fault.UNAVAILABLE: (503, "503 Service Temporarily Unavailable"),
    Fault.GATEWAY_TIMEOUT: (504, "504 Gateway Time-out"),
}
_LICENSE_BODY = {
    "status": 503,
    "error": "Service Unavailable",
    "code": "LICENSE_REQUIRED",
    "message": "This instance requires license activation. Open the manager to activate it.",
}
STATES = ("open", "connecting", "close")


@dataclass
class Instance:
    name: str
    state: str = "open"
    token: str | None = None  # the instance's own key, accepted besides the global one
    integration: str = "WHATSAPP-BAILEYS"  # "EVOLUTION" answers the minimal 201 body
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class Reply:
    """An arbitrary answer to script, for shapes no Fault row covers."""

    status: int
    body: Any = None  # bytes or str go out as-is (text/plain), anything else as JSON
    delivered: bool = False


@dataclass
class ReceivedSend:
    """One POST /message/sendText the fake received, and how it answered."""

    at: float  # time.monotonic() on arrival
    instance: str
    number: str | None
    text: str | None
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, None when malformed
    fault: Fault | Reply  # what was answered (natural checks included)
    status: int | None = None  # HTTP status answered; None when dropped
    delivered: bool = False
    key_id: str | None = None
    delay: int | None = None  # the `delay` asked for (ms): "typing..." shown that long first
    # sendMedia: mediatype, mimetype, media, fileName, caption as sent (v1: mediaMessage's)
    media: dict[str, Any] | None = None


@dataclass
class _Conn:
    """One TCP connection the fake accepted."""

    transport: asyncio.Transport
    requests: int = 0
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None


def _envelope(status: int, message: Any, error: str | None = None) -> web.Response:
    labels = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
    error = error or labels.get(status, "Internal Server Error")
    body = {"status": status, "error": error, "response": {"message": message}}
    return web.json_response(body, status=status)


def _reply(reply: Reply) -> web.Response:
    if isinstance(reply.body, bytes | str):
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        return web.Response(status=reply.status, body=body, content_type="text/plain")
    return web.json_response(reply.body, status=reply.status)


def _delay_of(body: Any) -> int | None:
    """The `delay` of a sendText body (v2 top level, v1 `options`), in milliseconds."""
    if not isinstance(body, dict):
        return None
    options = body.get("options")
    delay = options.get("delay") if isinstance(options, dict) else body.get("delay")
    return delay if isinstance(delay, int) and not isinstance(delay, bool) else None


def _jid(number: str) -> str:
    return number if "@" in number else re.sub(r"\D", "", number) + "@s.whatsapp.net"


def _norm(number: str) -> str:
    return number if "@" in number else re.sub(r"\D", "", number)


class FakeEvolution:
    """A real Evolution-like HTTP server on 127.0.0.1 with scriptable faults."""

    def __init__(
        self,
        *,
        api_key: str = "test-api-key",
        instances: Iterable[str] = ("main",),
        api_version: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        not_on_whatsapp: Iterable[str] = (),
        hang_seconds: float = 60.0,
    ) -> None:
        self.api_key = api_key
        self.instances: dict[str, Instance] = {n: Instance(n) for n in instances}
        self.api_version = api_version
        self.host = host
        self.port = port
        self.latency = latency  # seconds added before answering each send
        self.sends_in_progress = 0  # sendText requests being answered right now
        self.most_sends_in_progress = 0  # the most at any one time
        self.not_on_whatsapp = {_norm(n) for n in not_on_whatsapp}
        self.hang_seconds = hang_seconds
        self.license_required = False  # every route answers 503 LICENSE_REQUIRED
        self.any_instance = False  # an unknown instance name is created (open) on first use
        self.default_fault = Fault.OK
        self.received: list[ReceivedSend] = []
        self.state_probes: list[tuple[float, str]] = []
        self._scripts: dict[str | None, deque[Fault | Reply]] = defaultdict(deque)
        self._released = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._up_again: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Webhooks (shared/evolution-api.md "Delivery receipts"): the one row per instance that
        # webhook/set stores, the events posted to it, and the receipts stored per key.id.
        self.webhooks: dict[str, dict[str, Any]] = {}
        self.posted: list[tuple[str, dict[str, Any], int | None]] = []  # (url, body, status)
        self.status_updates: dict[str, list[str]] = defaultdict(list)  # key.id -> statuses
        # After each delivered send: post send.message, then messages.update with each status
        # here; `receipts_first` posts them BEFORE the 201 goes out (the race).
        self.auto_receipts: list[str] = []
        self.receipts_first = False
        # The messages Evolution stored, as findMessages answers them: one per delivered send
        # (not PRISMA: its database write failed). `find_messages_route = False` is a server
        # without the route (404 "Cannot POST ..."); `lookups` counts the calls.
        self.stored: list[dict[str, Any]] = []
        self.find_messages_route = True
        self.lookups = 0
        # Typing (`delay`): the answer is held for the delay, as Baileys sleeps before sending;
        # with a gate, until the gate opens instead (a test holds sends in flight at will).
        self.typing_gate: asyncio.Event | None = None
        self.typing_now = 0  # sends "typing" right now
        self._init_connections()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on host:port (port 0 picks a free one, kept across go_down/go_up)."""
        app = web.Application(client_max_size=_MAX_JSON)
        for method, path, handler in (
            ("GET", "/", self._root),
            ("POST", "/message/sendText/{instance}", self._send_text),
            ("POST", "/message/sendMedia/{instance}", self._send_media),
            ("GET", "/instance/connectionState/{instance}", self._connection_state),
            ("POST", "/webhook/set/{instance}", self._webhook_set),
            ("GET", "/webhook/find/{instance}", self._webhook_find),
            ("POST", "/chat/findStatusMessage/{instance}", self._find_status),
            ("POST", "/chat/findMessages/{instance}", self._find_messages),
            ("POST", "/_fake/event", self._ctl_event),
            ("GET", "/_fake/received", self._ctl_received),
            ("POST", "/_fake/script", self._ctl_script),
            ("POST", "/_fake/state", self._ctl_state),
            ("POST", "/_fake/down", self._ctl_down),
            ("POST", "/_fake/release", self._ctl_release),
            ("POST", "/_fake/reset", self._ctl_reset),
            ("GET", "/_fake/count", self._ctl_count),
        ):
            app.router.add_route(method, path, handler)
        app.router.add_route("*", "/{tail:.*}", self._no_route)
        app.middlewares.append(self._count_requests)
        # handler_cancellation: a hanging handler ends when its client gives up, as in node.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await self._runner.setup()
        self._watch_connections()
        await self.go_up()

    async def close(self) -> None:
        self.release()
        if self._up_again is not None:
            self._up_again.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._site is None

    async def go_down(self) -> None:
        """Stop listening and cut open connections: clients get "connection refused"."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                conn.force_close()
            # Cut means cut: the sockets close a loop turn after force_close.
            await self.wait_for_connections(lambda f: f.connections_open == 0)

    async def go_up(self) -> None:
        """Listen again on the same port."""
        assert self._runner is not None, "start() first"
        if self._site is None:
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self._site = site
            if self.port == 0:
                self.port = self._runner.addresses[0][1]

    # --- scripting ----------------------------------------------------------------------

    def script(
        self, responses: Iterable[Fault | Reply | str], *, number: str | None = None
    ) -> None:
        """Queue answers for the next sends to `number` (or to any number when None)."""
        queue = self._scripts[_norm(number) if number else None]
        queue.extend(r if isinstance(r, Reply) else Fault(r) for r in responses)

    def set_state(self, instance: str, state: str) -> None:
        """Set an instance's connectionState; creates the instance if needed."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self.instances.setdefault(instance, Instance(instance)).state = state

    def add_instance(
        self, name: str, *, state: str = "open", token: str | None = None, integration: str = ""
    ) -> Instance:
        inst = Instance(name, state, token, integration or "WHATSAPP-BAILEYS")
        self.instances[name] = inst
        return inst

    def delete_instance(self, name: str) -> None:
        """Delete an instance as Evolution's DELETE /instance/delete does: it no longer exists."""
        self.instances.pop(name, None)

    def release(self) -> None:
        """Let every request hanging on Fault.HANG answer now."""
        self._released.set()
        self._released = asyncio.Event()

    def reset(self) -> None:
        """Forget received sends and scripts; keep instances and switches."""
        self.received.clear()
        self.state_probes.clear()
        self._scripts.clear()
        self.stored.clear()

    @property
    def delivered(self) -> list[ReceivedSend]:
        """Sends WhatsApp got (including ones the client may not know about)."""
        return [r for r in self.received if r.delivered]

    async def wait_for_sends(self, count: int, timeout: float = 5.0) -> list[ReceivedSend]:
        """Wait until at least `count` sends have been received (and answered or dropped)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(
                lambda: (
                    sum(r.status is not None or r.fault is Fault.DROP for r in self.received)
                    >= count
                )
            )
        return list(self.received)

    async def wait_for_arrivals(self, count: int, timeout: float = 5.0) -> list[ReceivedSend]:
        """Wait until at least `count` sends have arrived, answered or not (e.g. hanging)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- connections: Node's keep-alive, counted ----------------------------------------------

    def _init_connections(self) -> None:
        self.idle_close = 5.0  # seconds an idle connection stays open, like node's default
        self.connections_opened = 0  # TCP connections accepted, ever
        self.connections_open = 0  # open now
        self.peak_connections = 0  # most open at once
        self.idle_closes = 0  # connections the fake closed for idling (its FIN already sent)
        self.requests_seen = 0  # requests of any route, ever
        self.requests_in_flight = 0  # being handled now
        self.peak_requests = 0  # most handled at once
        self._conns: dict[web.RequestHandler, _Conn] = {}
        self._conn_changed = asyncio.Event()

    def _watch_connections(self) -> None:
        # Node starts its keep-alive timer when a response ends and stops it when a request
        # arrives; aiohttp's own timer does the same but cannot be counted, so this one is ours
        # (aiohttp's stays far longer).
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._conns[handler] = _Conn(transport)
            self.connections_opened += 1
            self.connections_open += 1
            self.peak_connections = max(self.peak_connections, self.connections_open)
            self._arm_idle(handler)
            self._conn_changed.set()

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            conn = self._conns.pop(handler, None)
            if conn is not None:
                if conn.timer is not None:
                    conn.timer.cancel()
                self.connections_open -= 1
                self._conn_changed.set()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    @web.middleware
    async def _count_requests(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        proto = request.protocol
        conn = self._conns.get(proto) if isinstance(proto, web.RequestHandler) else None
        if conn is not None:
            conn.requests += 1
            conn.in_flight += 1
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
        self.requests_seen += 1
        self.requests_in_flight += 1
        self.peak_requests = max(self.peak_requests, self.requests_in_flight)
        try:
            return await handler(request)
        finally:
            self.requests_in_flight -= 1
            if conn is not None:
                conn.in_flight -= 1
                if conn.in_flight == 0 and isinstance(proto, web.RequestHandler):
                    self._arm_idle(proto)

    def _arm_idle(self, handler: web.RequestHandler) -> None:
        conn = self._conns.get(handler)
        if conn is None:
            return
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = asyncio.get_running_loop().call_later(
            self.idle_close, self._close_idle, handler
        )

    def _close_idle(self, handler: web.RequestHandler) -> None:
        conn = self._conns.get(handler)
        if conn is None or conn.in_flight:
            return
        conn.timer = None
        # As node's socket.destroy(): the FIN goes out now (transport.close() would send it on
        # a later loop turn), and bytes arriving after it are never read.
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        conn.transport.close()
        self.idle_closes += 1
        self._conn_changed.set()

    @property
    def requests_per_connection(self) -> list[int]:
        """Requests served on each open connection."""
        return [c.requests for c in self._conns.values()]

    async def wait_for_connections(
        self, predicate: Callable[[FakeEvolution], bool], timeout: float = 5.0
    ) -> None:
        """Wait until `predicate(self)` holds for the connection counters."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._conn_changed.clear()
                await self._conn_changed.wait()

    # --- the Evolution routes -----------------------------------------------------------

    def _gate(self, request: web.Request) -> tuple[Instance | None, web.Response | None]:
        """Licence, then instance, then key - the order the real server checks them in."""
        if self.license_required:
            return None, web.json_response(_LICENSE_BODY, status=503)
        name = request.match_info["instance"]
        inst = self.instances.get(name)
        if inst is None and self.any_instance:
            inst = self.add_instance(name)
        if inst is None:
            return None, _envelope(404, [f'The "{name}" instance does not exist'])
        key = request.headers.get("apikey")
        if key is None or key not in (self.api_key, inst.token):
            return None, _envelope(401, "Unauthorized")
        return inst, None

    async def _root(self, request: web.Request) -> web.Response:
        if self.license_required:
            return web.json_response(_LICENSE_BODY, status=503)
        return web.json_response(
            {
                "status": 200,
                "message": "Welcome to the Evolution API, it is working!",
                "version": "1.8.2" if self.api_version == 1 else "2.3.7",
                "clientName": "evolution_exchange",
                "manager": f"{self.url}/manager",
                "documentation": "https://doc.evolution-api.com",
            }
        )

    async def _connection_state(self, request: web.Request) -> web.Response:
        self.state_probes.append((time.monotonic(), request.match_info["instance"]))
        inst, refusal = self._gate(request)
        if refusal is not None:
            return refusal
        assert inst is not None
        return web.json_response({"instance": {"instanceName": inst.name, "state": inst.state}})

    async def _no_route(self, request: web.Request) -> web.Response:
        if self.license_required:
            return web.json_response(_LICENSE_BODY, status=503)
        return _envelope(404, [f"Cannot {request.method} {request.path}"])

    async def _send_text(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, self._fields)

    async def _send_media(self, request: web.Request) -> web.StreamResponse:
        """POST /message/sendMedia: recorded like a text, `text` the caption."""
        return await self._send(request, self._media_fields)

    async def _send(
        self,
        request: web.Request,
        fields: Callable[[Any], tuple[str | None, str | None, dict[str, Any] | None]],
    ) -> web.StreamResponse:
        """One send, text or media: recorded, counted while in progress, then answered."""
        arrived = time.monotonic()
        raw = await request.read()
        body: Any = None
        malformed: str | None = None
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            malformed = str(exc)
        number, text, media = fields(body)
        record = ReceivedSend(
            at=arrived,
            instance=request.match_info["instance"],
            number=number,
            text=text,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            fault=Fault.OK,
            media=media,
        )
        self.received.append(record)
        self.sends_in_progress += 1
        self.most_sends_in_progress = max(self.most_sends_in_progress, self.sends_in_progress)
        try:
            return await self._answer(request, record, malformed)
        finally:
            self.sends_in_progress -= 1
            await self._notify()

    def _media_fields(self, body: Any) -> tuple[str | None, str | None, dict[str, Any]]:
        media: dict[str, Any] = {}
        number = None
        if isinstance(body, dict):
            number = body.get("number") if isinstance(body.get("number"), str) else None
            inner = body.get("mediaMessage") if self.api_version == 1 else body
            if isinstance(inner, dict):
                media = {
                    k: inner[k]
                    for k in ("mediatype", "mimetype", "media", "fileName", "caption")
                    if k in inner
                }
        caption = media.get("caption")
        return number, caption if isinstance(caption, str) else None, media

    def _choose_media(self, inst: Instance, record: ReceivedSend) -> Fault:
        """sendMedia's own checks, in the real server's order: schema, then the controller's
        url-or-base64 and file-name rules, then the upload (which needs a paired instance)."""
        body, media = record.body, record.media or {}
        if self.api_version == 1:
            if not isinstance(body, dict) or not isinstance(body.get("mediaMessage"), dict):
                return Fault.V1_MEDIA_SCHEMA
            if "caption" in media and media["caption"] in ("", None):
                return Fault.V1_EMPTY_CAPTION
        else:
            if not isinstance(body, dict) or media.get("mediatype") not in _MEDIA_TYPES:
                return Fault.MEDIA_SCHEMA
            if "caption" in media and not isinstance(media["caption"], str):
                return Fault.MEDIA_NULL_CAPTION
        if record.number is None:
            return Fault.MEDIA_SCHEMA if self.api_version == 2 else Fault.V1_MEDIA_SCHEMA
        source = media.get("media")
        is_url = isinstance(source, str) and _is_url(source)
        if not isinstance(source, str) or not (is_url or _is_base64(source)):
            return Fault.MEDIA_NOT_URL_OR_BASE64
        if media.get("mediatype") == "document" and not is_url and not media.get("fileName"):
            return Fault.MEDIA_NO_FILENAME
        if inst.state == "close":
            return Fault.MEDIA_NOT_PAIRED
        if inst.state == "connecting":
            return Fault.MEDIA_UPLOAD_FAILED
        if _norm(record.number) in self.not_on_whatsapp:
            return Fault.NOT_ON_WHATSAPP
        if self.default_fault is Fault.OK and inst.integration == "EVOLUTION":
            return Fault.OK_MINIMAL
        return self.default_fault

    def _fields(self, body: Any) -> tuple[str | None, str | None, None]:
        if not isinstance(body, dict):
            return None, None, None
        number, text = body.get("number"), body.get("text")
        if isinstance(body.get("textMessage"), dict):  # the v1 body
            text = body["textMessage"].get("text")
        return (
            number if isinstance(number, str) else None,
            text if isinstance(text, str) else None,
            None,
        )

    async def _answer(
        self, request: web.Request, record: ReceivedSend, malformed: str | None
    ) -> web.StreamResponse:
        if malformed is not None:
            # body-parser runs before routing in the real server, so this precedes every check.
            record.fault, record.status = Fault.MALFORMED_JSON, 400
            return _envelope(400, malformed, "Internal Server Error")
        inst, refusal = self._gate(request)
        if refusal is not None:
            record.status = refusal.status
            record.fault = {401: Fault.UNAUTHORIZED, 404: Fault.UNKNOWN_INSTANCE}.get(
                refusal.status, Fault.LICENSE
            )
            return refusal
        assert inst is not None
        record.fault = fault = self._choose(inst, record)
        if isinstance(fault, Reply):
            record.delivered, record.status = fault.delivered, fault.status
            if fault.delivered:
                self._store(inst, record, Fault.OK)
            return _reply(fault)
        record.delivered = fault in DELIVERS
        if self.latency:
            await asyncio.sleep(self.latency)
        record.delay = _delay_of(record.body)
        if record.delay and record.delivered:
            await self._typing(record.delay)
        if record.delivered and fault is not Fault.PRISMA:
            self._store(inst, record, fault)  # stored as it goes out, before any answer
        if fault is Fault.DROP:
            await self._notify()
            if request.transport is not None:
                request.transport.close()
            await asyncio.Event().wait()  # cancelled as the connection goes away
        if fault is Fault.HANG:
            await self._notify()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hang_seconds):
                    await self._released.wait()
        response = self._response(fault, inst, record)
        record.status = response.status
        if record.key_id is not None and record.delivered:
            if self.receipts_first:
                await self._after_send(inst, record)
            else:
                self._spawn(self._after_send(inst, record))
        return response

    async def _typing(self, delay_ms: int) -> None:
        """Show "typing..." for `delay_ms` (or until typing_gate opens) before sending."""
        self.typing_now += 1
        await self._notify()
        try:
            if self.typing_gate is not None:
                await self.typing_gate.wait()
            else:
                await asyncio.sleep(delay_ms / 1000)
        finally:
            self.typing_now -= 1

    async def wait_typing(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` sends are "typing" at once."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.typing_now >= count)

    # --- webhooks -----------------------------------------------------------------------

    async def _after_send(self, inst: Instance, record: ReceivedSend) -> None:
        assert record.key_id is not None
        body = {
            "key": {"remoteJid": _jid(record.number or ""), "fromMe": True, "id": record.key_id},
            "status": "PENDING",
            "message": {"conversation": record.text or ""},
            "messageType": "conversation",
            "instanceId": inst.instance_id,
        }
        await self.post_event(inst.name, "send.message", body)
        for status in self.auto_receipts:
            await self.receipt(record.key_id, status, instance=inst.name, remote=record.number)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def receipt(
        self,
        key_id: str,
        status: str,
        *,
        instance: str = "main",
        remote: str | None = None,
        from_me: bool = True,
    ) -> int | None:
        """Post one messages.update (as Baileys does for a receipt); returns evomsgd's status."""
        self.status_updates[key_id].append(status)
        inst = self.instances.get(instance)
        data = {
            "keyId": key_id,
            "remoteJid": _jid(remote or "5511988887777"),
            "fromMe": from_me,
            "status": status,
            "instanceId": inst.instance_id if inst else str(uuid.uuid4()),
        }
        return await self.post_event(instance, "messages.update", data)

    async def connection_update(self, instance: str, state: str, reason: int = 200) -> int | None:
        """Post one connection.update, and make connectionState agree."""
        if state in STATES:
            self.set_state(instance, state)
        data = {"instance": instance, "state": state, "statusReason": reason}
        return await self.post_event(instance, "connection.update", data)

    async def post_event(self, instance: str, event: str, data: Any) -> int | None:
        """POST one event to the instance's webhook as Evolution does; None when none is set
        (or the event is not subscribed, or the call failed)."""
        import aiohttp  # the fake's client side, only for webhooks

        hook = self.webhooks.get(instance)
        if hook is None or not hook["enabled"]:
            return None
        name = event.upper().replace(".", "_")
        if hook["events"] and name not in hook["events"]:
            return None
        url = hook["url"]
        if hook["webhookByEvents"]:
            url = url.rstrip("/") + "/" + event.replace(".", "-")
        body = {
            "event": event,
            "instance": instance,
            "data": data,
            "destination": hook["url"],
            "date_time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "sender": "5511999990000@s.whatsapp.net",
            "server_url": self.url,
            "apikey": (self.instances[instance].token if instance in self.instances else None)
            or "instance-token-" + instance,
        }
        headers = {"Content-Type": "application/json", "User-Agent": "axios/1.13.2"}
        headers.update(hook["headers"] or {})
        status: int | None = None
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, data=json.dumps(body), headers=headers) as resp,
            ):
                status = resp.status
        except aiohttp.ClientError:
            status = None
        self.posted.append((url, body, status))
        return status

    async def _webhook_set(self, request: web.Request) -> web.Response:
        inst, refusal = self._gate(request)
        if refusal is not None:
            return refusal
        assert inst is not None
        body = await request.json()
        hook = body.get("webhook") if isinstance(body, dict) else None
        if not isinstance(hook, dict):
            return _envelope(400, [['instance requires property "webhook"']])
        if not hook.get("url"):
            return _envelope(400, [['The "url" cannot be empty']])
        enabled = bool(hook.get("enabled"))
        if enabled and "events" not in hook:
            return _envelope(500, "Cannot read properties of undefined (reading 'length')")
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        row = {
            "id": "cm" + secrets.token_hex(12),
            "url": hook["url"],
            "headers": hook.get("headers") or {},
            "enabled": enabled,
            "events": list(hook.get("events") or []) if enabled else [],
            "webhookByEvents": bool(hook.get("byEvents")),
            "webhookBase64": bool(hook.get("base64")),
            "createdAt": self.webhooks.get(inst.name, {}).get("createdAt", now),
            "updatedAt": now,
            "instanceId": inst.instance_id,
        }
        self.webhooks[inst.name] = row
        return web.json_response(row, status=201)

    async def _webhook_find(self, request: web.Request) -> web.Response:
        inst, refusal = self._gate(request)
        if refusal is not None:
            return refusal
        assert inst is not None
        return web.json_response(self.webhooks.get(inst.name))

    async def _query(
        self, request: web.Request
    ) -> tuple[Instance, dict[str, Any], dict[str, Any]] | web.Response:
        """A chat look-up's instance, body and `where` (empty when absent), or its refusal."""
        inst, refusal = self._gate(request)
        if refusal is not None:
            return refusal
        assert inst is not None
        body = await request.json()
        body = body if isinstance(body, dict) else {}
        where = body.get("where")
        return inst, body, where if isinstance(where, dict) else {}

    async def _find_status(self, request: web.Request) -> web.Response:
        query = await self._query(request)
        if isinstance(query, web.Response):
            return query
        inst, _, where = query
        wanted = where.get("id")
        rows = [
            {
                "id": "cm" + secrets.token_hex(8),
                "keyId": key,
                "remoteJid": None,
                "fromMe": True,
                "participant": None,
                "pollUpdates": None,
                "status": status,
                "messageId": "cm" + secrets.token_hex(8),
                "instanceId": inst.instance_id,
            }
            for key, statuses in self.status_updates.items()
            if wanted is None or key == wanted
            for status in statuses
        ]
        return web.json_response(rows)

    def _store(self, inst: Instance, record: ReceivedSend, fault: Fault) -> None:
        """Keep a delivered send as Evolution's database does (the `Message` row)."""
        minimal = fault is Fault.OK_MINIMAL  # the EVOLUTION channel's row, as its 201
        record.key_id = record.key_id or _new_key(fault)
        number = record.number or ""
        kind, body = "conversation", {"conversation": record.text or ""}
        if record.media is not None:  # sendMedia: the caption inside the media's own message
            kind = f"{record.media.get('mediatype')}Message"
            shown = {
                "mimetype": record.media.get("mimetype"),
                "fileName": record.media.get("fileName"),
            }
            if record.text:
                shown["caption"] = record.text
            body = {kind: shown}
        self.stored.append(
            {
                "id": "cm" + secrets.token_hex(12),
                "key": {
                    "id": record.key_id,
                    "fromMe": True,
                    "remoteJid": number if minimal else _jid(number),
                },
                "pushName": None if minimal else "Você",
                "messageType": kind,
                "message": body,
                "messageTimestamp": int(time.time()),
                "instanceId": inst.instance_id,
                "source": "unknown" if minimal else "web",
                "contextInfo": None,
                "MessageUpdate": [],
            }
        )

    async def _find_messages(self, request: web.Request) -> web.Response:
        """`POST /chat/findMessages`: stored messages filtered by `where.key` (id, remoteJid,
        fromMe - only `fromMe: true` filters, as in the real code), newest first, paged by
        `offset` (page size, 50) and `page` (shared/evolution-api.md)."""
        self.lookups += 1
        if not self.find_messages_route:
            return await self._no_route(request)
        query = await self._query(request)
        if isinstance(query, web.Response):
            return query
        inst, body, where = query
        key = where.get("key") if isinstance(where.get("key"), dict) else {}
        rows = [
            m
            for m in self.stored
            if m["instanceId"] == inst.instance_id
            and (not key.get("id") or m["key"]["id"] == key["id"])
            and (not key.get("remoteJid") or m["key"]["remoteJid"] == key["remoteJid"])
            and (not key.get("fromMe") or m["key"]["fromMe"] is True)
        ]
        rows.sort(key=lambda m: m["messageTimestamp"], reverse=True)
        size = int(body.get("offset") or 50)
        page = int(body.get("page") or 1)
        if self.api_version == 1:  # 1.8 answers the bare list
            return web.json_response(rows[(page - 1) * size : page * size])
        return web.json_response(
            {
                "messages": {
                    "total": len(rows),
                    "pages": -(-len(rows) // size),
                    "currentPage": page,
                    "records": rows[(page - 1) * size : page * size],
                }
            }
        )

    def _choose(self, inst: Instance, record: ReceivedSend) -> Fault | Reply:
        for queue_key in (_norm(record.number) if record.number else "", None):
            queue = self._scripts.get(queue_key)
            if queue:
                return queue.popleft()
        if record.media is not None:
            return self._choose_media(inst, record)
        body, number, text = record.body, record.number, record.text
        if not isinstance(body, dict):
            return Fault.V1_SCHEMA if self.api_version == 1 else Fault.SCHEMA
        if self.api_version == 1 and not isinstance(body.get("textMessage"), dict):
            return Fault.V1_SCHEMA
        if number is None or text is None or (self.api_version == 2 and "text" not in body):
            return Fault.SCHEMA
        if not text.strip():
            return Fault.BLANK_TEXT
        if inst.state == "close":
            return Fault.NOT_PAIRED
        if inst.state == "connecting":
            return Fault.CONNECTION_CLOSED_500
        if _norm(number) in self.not_on_whatsapp:
            return Fault.NOT_ON_WHATSAPP
        if self.default_fault is Fault.OK and inst.integration == "EVOLUTION":
            return Fault.OK_MINIMAL
        return self.default_fault

    def _response(self, fault: Fault, inst: Instance, record: ReceivedSend) -> web.Response:
        number = record.number or ""
        if fault in (Fault.OK, Fault.HANG, Fault.OK_MINIMAL):
            return web.json_response(self._sent_body(fault, inst, record), status=201)
        if fault is Fault.OK_NO_KEY:
            return web.json_response(
                {"status": "PENDING", "messageType": "conversation"}, status=201
            )
        if fault is Fault.LICENSE:
            return web.json_response(_LICENSE_BODY, status=503)
        if fault in _PROXY_PAGES:
            status, title = _PROXY_PAGES[fault]
            page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
            return web.Response(status=status, text=page, content_type="text/html")
        if fault is Fault.NOT_ON_WHATSAPP:
            jid = _jid(number)
            return _envelope(400, [{"jid": jid, "exists": False, "number": number}])
        if fault is Fault.WRONG_PATH:
            return _envelope(404, [f"Cannot POST /message/sendText/{inst.name}"])
        if fault is Fault.UNKNOWN_INSTANCE:
            return _envelope(404, [f'The "{inst.name}" instance does not exist'])
        if fault is Fault.SCHEMA:
            body = record.body if isinstance(record.body, dict) else {}
            missing = [p for p in ("number", "text") if not isinstance(body.get(p), str)]
            messages = [f'instance requires property "{p}"' for p in missing or ["text"]]
            return _envelope(400, [messages])
        status, message, label = _FAULT_BODIES[fault]
        return _envelope(status, message, label)

    def _sent_body(self, fault: Fault, inst: Instance, record: ReceivedSend) -> dict[str, Any]:
        number, text = record.number or "", record.text or ""
        now = int(time.time())
        if fault is Fault.OK_MINIMAL:
            record.key_id = record.key_id or str(uuid.uuid4())
            return {
                "key": {"remoteJid": number, "fromMe": True, "id": record.key_id},
                "message": {"conversation": text},
                "messageType": "conversation",
                "messageTimestamp": now,
                "source": "unknown",  # as a real 2.3.7 EVOLUTION instance answered
                "instanceId": inst.instance_id,
            }
        record.key_id = record.key_id or _new_key(fault)
        key = {"remoteJid": _jid(number), "fromMe": True, "id": record.key_id}
        if record.media is not None:
            kind = f"{record.media.get('mediatype')}Message"
            shown = {"caption": text, "mimetype": record.media.get("mimetype")}
            if "fileName" in record.media:
                shown["fileName"] = record.media["fileName"]
            return {
                "key": key,
                "pushName": "Você",
                "status": "PENDING",
                "message": {kind: shown},
                "messageType": kind,
                "messageTimestamp": str(now) if self.api_version == 1 else now,
                "instanceId": inst.instance_id,
                "source": "web",
            }
        if self.api_version == 1:
            return {
                "key": key,
                "message": {"extendedTextMessage": {"text": text}},
                "messageTimestamp": str(now),
                "status": "PENDING",
            }
        return {
            "key": key,
            "pushName": "Você",
            "status": "PENDING",
            "message": {"conversation": text},
            "contextInfo": None,
            "messageType": "conversation",
            "messageTimestamp": now,
            "instanceId": inst.instance_id,
            "source": "web",
        }

    # --- control routes for a fake run as a separate process ----------------------------

    async def _ctl_event(self, request: web.Request) -> web.Response:
        """Post an event to the instance's webhook: {"instance", "event", "data"}."""
        data = await request.json()
        status = await self.post_event(data.get("instance", "main"), data["event"], data["data"])
        return web.json_response({"ok": True, "status": status})

    async def _ctl_received(self, request: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(r) for r in self.received], dumps=_dumps)

    async def _ctl_script(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.script(data["responses"], number=data.get("number"))
        return web.json_response({"ok": True})

    async def _ctl_state(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.set_state(data["instance"], data["state"])
        return web.json_response({"ok": True})

    async def _ctl_down(self, request: web.Request) -> web.StreamResponse:
        seconds = float((await request.json()).get("seconds", 1.0))
        # Answer before going down: going down cuts this very connection.
        response = web.json_response({"ok": True, "down_for": seconds})
        await response.prepare(request)
        await response.write_eof()
        await self.go_down()
        loop = asyncio.get_running_loop()
        self._up_again = loop.call_later(seconds, self._schedule_up)
        return response

    def _schedule_up(self) -> None:
        task = asyncio.get_running_loop().create_task(self.go_up())
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def _ctl_release(self, request: web.Request) -> web.Response:
        self.release()
        return web.json_response({"ok": True})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _ctl_count(self, request: web.Request) -> web.Response:
        answered = sum(r.status is not None for r in self.received)
        return web.json_response({"received": len(self.received), "answered": answered})


def _new_key(fault: Fault) -> str:
    # An EVOLUTION-channel instance uses UUIDs; Baileys WhatsApp's hex ids.
    if fault is Fault.OK_MINIMAL:
        return str(uuid.uuid4())
    return "3EB0" + secrets.token_hex(9).upper()


def _dumps(data: Any) -> str:
    return json.dumps(data, default=repr)


# status, response.message, error label
_FAULT_BODIES: dict[Fault, tuple[int, Any, str | None]] = {
    Fault.UNAUTHORIZED: (401, "Unauthorized", None),
    Fault.CORS: (500, "Not allowed by CORS", None),
    Fault.SCHEMA: (400, [['instance requires property "text"']], None),
    Fault.V1_SCHEMA: (400, [['instance requires property "textMessage"']], None),
    Fault.BLANK_TEXT: (400, ["Text is required"], None),
    Fault.MALFORMED_JSON: (
        400,
        "Unexpected token } in JSON at position 42",
        "Internal Server Error",
    ),
    Fault.CONNECTION_CLOSED: (400, ["Error: Connection Closed"], None),
    Fault.TIMED_OUT: (400, ["Error: Timed Out"], None),
    Fault.SESSION_ERROR: (400, ["SessionError: No sessions"], None),
    Fault.RATE_LIMIT: (400, ["Error: rate-overlimit"], None),
    Fault.PRISMA: (
        400,
        "PrismaClientKnownRequestError: \nInvalid `this.prismaRepository.message.create()` "
        "invocation: Unique constraint failed on the fields: (`id`)",
        None,
    ),
    Fault.NOT_PAIRED: (500, "Cannot read properties of undefined (reading 'onWhatsApp')", None),
    Fault.LOADING: (500, "Cannot read properties of undefined (reading 'textMessage')", None),
    Fault.CONNECTION_CLOSED_500: (500, "Connection Closed", None),
    Fault.TIMED_OUT_500: (500, "Timed Out", None),
    Fault.SERVER_ERROR: (500, "Something went wrong", None),
    Fault.MEDIA_SCHEMA: (400, [['instance requires property "mediatype"']], None),
    Fault.V1_MEDIA_SCHEMA: (400, [['instance requires property "mediaMessage"']], None),
    Fault.MEDIA_NULL_CAPTION: (400, [["caption is not of a type(s) string"]], None),
    Fault.V1_EMPTY_CAPTION: (400, [['The "caption" cannot be empty']], None),
    Fault.MEDIA_NOT_URL_OR_BASE64: (400, ["Owned media must be a url or base64"], None),
    Fault.MEDIA_NO_FILENAME: (400, ["For base64 the file name must be informed."], None),
    Fault.MEDIA_UPLOAD_FAILED: (500, ["Error: Media upload failed on all hosts"], None),
    Fault.MEDIA_NOT_PAIRED: (
        500,
        ["TypeError: Cannot read properties of undefined (reading 'waUploadToServer')"],
        None,
    ),
}

# sendMedia's `mediatype` values, and the real server's JSON body limit (main.ts:62-63).
_MEDIA_TYPES = ("image", "document", "video", "audio")
_MAX_JSON = 136 * 1024 * 1024
_BASE64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


def _is_url(value: str) -> bool:
    """class-validator's isURL with its defaults, as far as evomsgd can meet it: http, https or
    ftp, a dotted host name or an IP, at most 2084 characters."""
    if len(value) > 2084:
        return False
    match = re.match(r"^(?:https?|ftp)://([^/:?#]+|\[[0-9a-fA-F:]+\])(?::\d+)?(?:[/?#]|$)", value)
    return match is not None and ("." in match.group(1) or ":" in match.group(1))


def _is_base64(value: str) -> bool:
    """validator's isBase64: the standard alphabet, length a multiple of 4, no line breaks."""
    return bool(value) and len(value) % 4 == 0 and _BASE64.match(value) is not None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the fake Evolution API server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default="test-api-key")
    parser.add_argument("--instances", default="main", help="comma-separated names")
    parser.add_argument(
        "--state", action="append", default=[], help="instance=open|connecting|close"
    )
    parser.add_argument("--token", action="append", default=[], help="instance=own-key")
    parser.add_argument("--api-version", type=int, choices=(1, 2), default=2)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per send")
    parser.add_argument("--not-on-whatsapp", default="", help="comma-separated numbers")
    parser.add_argument("--license-required", action="store_true")
    parser.add_argument(
        "--idle-close", type=float, default=5.0, help="seconds before an idle connection closes"
    )
    parser.add_argument(
        "--any-instance", action="store_true", help="every instance name exists (open)"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeEvolution(
        api_key=args.api_key,
        instances=[n for n in args.instances.split(",") if n],
        api_version=args.api_version,
        host=args.host,
        port=args.port,
        latency=args.latency,
        not_on_whatsapp=[n for n in args.not_on_whatsapp.split(",") if n],
    )
    fake.license_required = args.license_required
    fake.idle_close = args.idle_close
    fake.any_instance = args.any_instance
    for item in args.state:
        name, _, state = item.partition("=")
        fake.set_state(name, state)
    for item in args.token:
        name, _, token = item.partition("=")
        fake.instances.setdefault(name, Instance(name)).token = token
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(f"READY {fake.port}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
