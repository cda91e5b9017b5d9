"""The only code that speaks HTTP to Evolution API: one call in, one typed outcome out.

What an answer means is decided by the pure rules in `outcomes`; this module does the I/O.
Why one module of about 600 lines: every call (send text and media, the look-ups, the webhook,
the state probe) shares the pooled session, its idle rule and the retry of a request that was
never written; the sandbox client beside it implements the same `Sender` protocol. The rules
already stand apart in `outcomes.py` and `lookups.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import select
import time
import weakref
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import NEEDS_CLEANUP_CLOSED, Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from evomsgd.evolution.lookups import (
    WEBHOOK_EVENTS,
    Answer,
    find_messages_body,
    find_status_body,
    parse_messages,
    parse_status_updates,
    parse_webhook,
)
from evomsgd.evolution.outcomes import (
    STATE_REASONS,
    InstanceState,
    OutcomeKind,
    SendOutcome,
    ServerInfo,
    StateProbe,
    classify_exception,
    classify_response,
    loads,
    may_have_sent,
    never_written,
    parse_state,
)
from evomsgd.log import log_fields

logger = logging.getLogger("evomsgd.evolution")

# Evolution's answers are a few hundred bytes; a cap keeps a misconfigured URL that points at
# something large from being read into memory in full.
_MAX_BODY = 256 * 1024
# Health probes run every 30-60 s; waiting the full send timeout (sized for WhatsApp's slow
# number lookup) would only delay the verdict.
_PROBE_TIMEOUT = 10.0
# Scrubbing a very short key would mangle ordinary words in reasons; such a key is a
# misconfiguration anyway and reveals nothing when it shows up inside prose.
_MIN_SCRUB_LEN = 4
# Connections are pooled with keep-alive; reuse is safe because of the two guards in
# `_PoolConnector`: our idle timeout is below the server's, and a pooled connection the server
# closed anyway is dropped before a request is written on it. Without them a POST on a
# connection Evolution had just closed fails without an answer, which is AMBIGUOUS: a possible
# duplicate for a message that never went out.
_HEADERS = {"Accept": "application/json"}
# Idle pooled connections are closed after this long. Node's http server closes an idle
# keep-alive connection after `server.keepAliveTimeout`, 5 s by default, and Evolution does not
# change it; closing ours first, with seconds to spare, means we never pick a connection whose
# server-side timer is about to fire. aiohttp's own default (15 s) is above it.
IDLE_TIMEOUT = 2.0
# Per-instance sendText URLs kept ready (a send builds none); past this many, the cache restarts.
_URL_CACHE = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class OutgoingMedia:
    """One media send: `media` is a URL or the file's bytes in base64 (never both)."""

    kind: str  # image, document, video, audio: Evolution's mediatype
    media: str
    filename: str
    mimetype: str | None = None
    caption: str = ""  # "" sends none: Evolution refuses a null caption (v1: an empty one)

    def __repr__(self) -> str:  # never the bytes in a log line or a traceback
        return f"OutgoingMedia({self.kind}, {self.filename!r}, {len(self.media)} characters)"


@runtime_checkable
class Sender(Protocol):
    """What the queue needs from a client: the real one or the sandbox."""

    async def send_text(
        self, instance: str, number: str, text: str, *, delay: float = 0.0
    ) -> SendOutcome: ...

    async def send_media(self, instance: str, number: str, media: OutgoingMedia) -> SendOutcome: ...

    async def connection_state(self, instance: str) -> StateProbe: ...

    async def server_info(self) -> ServerInfo: ...

    async def find_messages(self, instance: str, remote_jid: str) -> Answer: ...

    async def find_status(self, instance: str, key_id: str, remote_jid: str | None) -> Answer: ...


# --- connections ------------------------------------------------------------------------------


def new_session(*, idle_timeout: float = IDLE_TIMEOUT) -> aiohttp.ClientSession:
    """The one way to open the session Evolution calls use: a keep-alive pool, see `connector`."""
    return aiohttp.ClientSession(connector=connector(idle_timeout=idle_timeout))


def connector(*, idle_timeout: float = IDLE_TIMEOUT) -> aiohttp.TCPConnector:
    """A keep-alive pool for Evolution: idle connections close before the server's do."""
    return _PoolConnector(
        keepalive_timeout=idle_timeout,
        # No cap: the daemon bounds sends in flight itself (up to ~1,000, one per paced lane). A
        # second, hidden bound here (aiohttp's default is 100) would make sends queue for a
        # connection inside their own timeout, unseen by any metric.
        limit=0,
        limit_per_host=0,
        # Aborts TLS transports that never finish closing (a CPython bug); aiohttp warns when
        # asked on a Python that no longer needs it.
        enable_cleanup_closed=NEEDS_CLEANUP_CLOSED,
    )


class _PoolConnector(aiohttp.TCPConnector):
    """Never hands out a pooled connection the server has already closed.

    The race this closes: Evolution closes an idle connection (its FIN is in our socket's
    receive queue) but the event loop has not read it yet, so aiohttp still sees the connection as
    open and takes it from the pool. The request is written, the server answers with a reset, and
    the send fails with `ServerDisconnectedError` (or `ClientOSError`) before any response byte.
    aiohttp retries that only for idempotent methods (client.py, `retry_persistent_connection`),
    never for our POST; and once the bytes are written, "the server closed before reading them"
    cannot be told from "the server read them, sent the message and died" (the DROP row of
    shared/evolution-api.md). So the decision is made before writing, where it is certain: an idle
    HTTP/1.1 connection has nothing to say, so a readable or failed socket means the server has
    closed it (or sent something we cannot interpret): drop it and take another or a new one.
    What remains is a close still on the wire as we write; the idle timeout below the server's
    keeps that for servers or proxies that close idle connections sooner than we do, and such a
    failure stays AMBIGUOUS.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()
        self.dropped_dead = 0  # pooled connections found closed by the server on reuse

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        while True:
            conn = await super().connect(req, traces, timeout)
            proto = conn.protocol
            if proto is None or proto not in self._handed_out:
                # A new connection: checking it would loop forever on a server that accepts and
                # closes at once, and its failure is "cannot connect", not ambiguous.
                if proto is not None:
                    self._handed_out.add(proto)
                return conn
            if not _closed_by_peer(proto):
                return conn
            self.dropped_dead += 1
            logger.debug("dropped a pooled connection Evolution had closed")
            conn.close()  # each pass removes one pooled connection, so the loop ends


def _closed_by_peer(proto: ResponseHandler) -> bool:
    transport = proto.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        # POLLIN covers the FIN (a read would return b""); POLLERR/POLLHUP (a reset) are
        # always reported.
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


# --- clients ---------------------------------------------------------------------------------


class EvolutionClient:
    """Sends texts and probes health over a caller-owned aiohttp session; never raises."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 90.0,
        api_version: int = 2,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"Evolution URL must look like http(s)://host[:port], got {base_url!r}"
            )
        if api_version not in (1, 2):
            raise ValueError(f"Evolution API version must be 1 or 2, got {api_version!r}")
        if timeout <= 0:
            raise ValueError(f"Evolution timeout must be positive, got {timeout!r}")
        self._session = session
        self._base = str(url.with_query(None).with_fragment(None)).rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._api_version = api_version
        # What every send shares, built once: aiohttp's per-request cost is most of a delivery's
        # CPU, and a prepared header set, timeout and URL, and a body serialised here (`data=`
        # rather than `json=`), take a fifth of it off (tests/bench figures in the commit).
        self._send_headers = CIMultiDict(
            {**_HEADERS, "Content-Type": "application/json", "apikey": api_key}
        )
        self._send_timeout = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))
        self._send_urls: dict[str, URL] = {}

    def __repr__(self) -> str:
        return (
            f"EvolutionClient(base_url={self._base!r}, api_version={self._api_version}, "
            f"timeout={self._timeout}, api_key=<hidden>)"
        )

    @property
    def base_url(self) -> str:
        return self._base

    @property
    def api_version(self) -> int:
        return self._api_version

    def _url(self, *parts: str) -> URL:
        path = "/".join(quote(p, safe="") for p in parts)
        return URL(f"{self._base}/{path}", encoded=True)

    def _scrub(self, text: str) -> str:
        if len(self._api_key) >= _MIN_SCRUB_LEN and self._api_key in text:
            return text.replace(self._api_key, "<api key>")
        return text

    def _scrub_outcome(self, outcome: SendOutcome) -> SendOutcome:
        detail = self._scrub(outcome.detail) if outcome.detail is not None else None
        reason = self._scrub(outcome.reason)
        if reason is outcome.reason and detail is outcome.detail:
            return outcome  # nothing to hide (every send that went well): no copy
        return dataclasses.replace(outcome, reason=reason, detail=detail)

    def _send_url(self, instance: str) -> URL:
        url = self._send_urls.get(instance)
        if url is None:
            if len(self._send_urls) >= _URL_CACHE:
                self._send_urls.clear()
            url = self._send_urls[instance] = self._url("message", "sendText", instance)
        return url

    def _body(self, number: str, text: str, delay: float = 0.0) -> dict[str, Any]:
        delay_ms = round(delay * 1000)  # Evolution wants whole milliseconds
        if self._api_version == 1:
            return {
                "number": number,
                "textMessage": {"text": text},
                "options": {"delay": delay_ms, "linkPreview": False},
            }
        body: dict[str, Any] = {"number": number, "text": text, "linkPreview": False}
        # Only when typing is asked for: the server holds the request open that long.
        if delay_ms > 0:
            body["delay"] = delay_ms
        return body

    async def send_text(
        self, instance: str, number: str, text: str, *, delay: float = 0.0
    ) -> SendOutcome:
        """POST one text, after `delay` seconds of "typing..." (Evolution's `delay`: the answer
        comes that much later, so the timeout grows by it); every HTTP or network problem
        comes back as an outcome."""
        started = time.monotonic()
        outcome = await self._send(instance, number, text, started, delay)
        return self._finish(instance, number, outcome, 'requires property "text"')

    def _media_body(self, number: str, media: OutgoingMedia) -> bytes:
        """sendMedia's body (shared/evolution-api.md, Send media): v2 flat, v1 `mediaMessage`;
        encoded JSON, the file spliced in as it is (see `_splice`)."""
        fields: dict[str, Any] = {"mediatype": media.kind}
        if media.mimetype:
            fields["mimetype"] = media.mimetype
        if media.caption:  # null is refused (v2), empty too (v1): absent means none
            fields["caption"] = media.caption
        # v2 replaces the mimetype with the type of fileName's extension; base64 documents
        # need one: always send it.
        fields["fileName"] = media.filename
        if self._api_version == 1:
            inner = _splice(fields, media.media)
            outer = json.dumps({"number": number, "options": {"delay": 0}}).encode()
            return outer[:-1] + b', "mediaMessage": ' + inner + b"}"
        return _splice({"number": number, **fields}, media.media)

    async def send_media(self, instance: str, number: str, media: OutgoingMedia) -> SendOutcome:
        """POST one media message (sendMedia); every problem comes back as an outcome."""
        started = time.monotonic()
        # A file in base64 makes a body of megabytes: built in a thread, not on the loop.
        data = await asyncio.to_thread(self._media_body, number, media)
        url = self._url("message", "sendMedia", instance)
        outcome = await self._post(url, data, self._send_timeout, instance, number, started)
        return self._finish(instance, number, outcome, 'requires property "mediatype"')

    def _finish(
        self, instance: str, number: str, outcome: SendOutcome, v2_schema: str
    ) -> SendOutcome:
        """Scrub and log an outcome; a v1 body refused by a v2 server's schema (`v2_schema`
        missing) is a configuration error, not the message's fault."""
        outcome = self._scrub_outcome(outcome)
        if (
            self._api_version == 1
            and outcome.kind is OutcomeKind.PERMANENT
            and v2_schema in (outcome.detail or "")
        ):
            outcome = dataclasses.replace(
                outcome,
                kind=OutcomeKind.CONFIG_ERROR,
                reason="Evolution expects the v2 message body (400) - the server is 2.x; "
                "set the API version to 2",
            )
        self._log(instance, number, outcome)
        return outcome

    async def _send(
        self, instance: str, number: str, text: str, started: float, delay: float = 0.0
    ) -> SendOutcome:
        url = self._send_url(instance)
        data = json.dumps(self._body(number, text, delay)).encode()
        timeout = self._send_timeout
        if delay:
            timeout = aiohttp.ClientTimeout(
                total=self._timeout + delay, connect=min(10.0, self._timeout)
            )
        return await self._post(url, data, timeout, instance, number, started)

    async def _post(
        self,
        url: URL,
        data: bytes,
        timeout: aiohttp.ClientTimeout,
        instance: str,
        number: str,
        started: float,
    ) -> SendOutcome:
        """POST one encoded send body; once more when nothing was written (see below)."""
        logger.debug(
            "sending to %s via instance %s", number, instance, extra=log_fields(instance=instance)
        )
        for attempt in (1, 2):
            try:
                async with self._session.post(
                    url,
                    data=data,
                    headers=self._send_headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    body = await _read_capped(resp)
                    return classify_response(resp.status, body, elapsed=time.monotonic() - started)
            except Exception as exc:  # never raise to the queue; CancelledError still propagates
                if attempt == 1 and never_written(exc):
                    # The pooled connection closed as we were about to write: nothing went
                    # out, so once more on a new connection (see _PoolConnector).
                    logger.debug("connection to Evolution closed before the send was written")
                    continue
                return self._failed(instance, exc, started)
        raise AssertionError("unreachable: the second attempt returns")

    def _failed(self, instance: str, exc: Exception, started: float) -> SendOutcome:
        """The outcome of a send that raised; logs what is not a network failure (a bug)."""
        if not isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
            logger.exception(
                "unexpected error sending via instance %s",
                instance,
                extra=log_fields(instance=instance),
            )
        return classify_exception(exc, sent=may_have_sent(exc), elapsed=time.monotonic() - started)

    def _log(self, instance: str, number: str, outcome: SendOutcome) -> None:
        # DEBUG only: the delivery logs every outcome once, with the task id this client never sees.
        logger.debug(
            "send to %s via instance %s: %s (HTTP %s, %.2f s, key %s): %s",
            number,
            instance,
            outcome.kind,
            outcome.http_status,
            outcome.elapsed,
            outcome.key_id,
            outcome.reason,
            extra=log_fields(instance=instance),
        )

    async def _get(self, url: URL, *, with_key: bool) -> tuple[int, bytes]:
        headers = dict(_HEADERS)
        if with_key:
            headers["apikey"] = self._api_key
        limit = min(_PROBE_TIMEOUT, self._timeout)
        timeout = aiohttp.ClientTimeout(total=limit, connect=limit)
        async with self._session.get(
            url, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            return resp.status, await _read_capped(resp)

    async def connection_state(self, instance: str) -> StateProbe:
        """Ask Evolution whether an instance is paired and connected; never raises."""
        try:
            status, body = await self._get(
                self._url("instance", "connectionState", instance), with_key=True
            )
        except Exception as exc:
            if not may_have_sent(exc):
                reason = classify_exception(exc, sent=False).reason
                return StateProbe(InstanceState.UNKNOWN, OutcomeKind.UPSTREAM_DOWN, reason)
            # A probe is safe to repeat: a failure after sending is only "try again".
            reason = f"Evolution did not answer the state probe ({type(exc).__name__})"
            return StateProbe(InstanceState.UNKNOWN, OutcomeKind.TRANSIENT, reason)
        if status == 200:
            state = parse_state(loads(body))
            if state is None:
                return StateProbe(
                    InstanceState.UNKNOWN,
                    OutcomeKind.TRANSIENT,
                    "Evolution answered the state probe without a recognisable state",
                )
            return StateProbe(state, None, STATE_REASONS[state].format(instance=instance), status)
        outcome = classify_response(status, body)
        kind = outcome.kind
        if kind not in (
            OutcomeKind.UPSTREAM_DOWN,
            OutcomeKind.CONFIG_ERROR,
            OutcomeKind.UNKNOWN_INSTANCE,
        ):
            kind = OutcomeKind.TRANSIENT
        return StateProbe(InstanceState.UNKNOWN, kind, self._scrub(outcome.reason), status)

    async def _call(self, method: str, url: URL, body: Any = None) -> Answer:
        """One call other than a send (a read, or an idempotent write): 2xx -> its JSON body;
        anything else -> why not, in an operator's words. Never raises."""
        headers = {**_HEADERS, "apikey": self._api_key}
        limit = min(_PROBE_TIMEOUT, self._timeout)
        timeout = aiohttp.ClientTimeout(total=limit, connect=limit)
        try:
            async with self._session.request(
                method, url, json=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status, raw = resp.status, await _read_capped(resp)
        except Exception as exc:
            reason = classify_exception(exc, sent=False).reason
            return Answer(False, reason=self._scrub(reason))
        if 200 <= status < 300:
            return Answer(True, loads(raw), http_status=status)
        return Answer(
            False, reason=self._scrub(classify_response(status, raw).reason), http_status=status
        )

    async def find_webhook(self, instance: str) -> Answer:
        """`GET /webhook/find/{instance}`: `data` is its WebhookConfig, or None when none is set."""
        answer = await self._call("GET", self._url("webhook", "find", instance))
        return dataclasses.replace(answer, data=parse_webhook(answer.data)) if answer.ok else answer

    async def set_webhook(self, instance: str, url: str, headers: dict[str, str]) -> Answer:
        """`POST /webhook/set/{instance}`: Evolution's one webhook of the instance becomes `url`
        with evomsgd's events (and `headers`: v2 only; v1 cannot send custom headers)."""
        if self._api_version == 1:
            body: dict[str, Any] = {
                "enabled": True,
                "url": url,
                "webhook_by_events": False,
                "webhook_base64": False,
                "events": list(WEBHOOK_EVENTS),
            }
        else:
            body = {
                "webhook": {
                    "enabled": True,
                    "url": url,
                    "events": list(WEBHOOK_EVENTS),  # always sent: omitted, Evolution answers 500
                    "headers": headers,
                    "byEvents": False,
                    "base64": False,
                }
            }
        return await self._call("POST", self._url("webhook", "set", instance), body)

    async def find_messages(self, instance: str, remote_jid: str) -> Answer:
        """`POST /chat/findMessages/{instance}`: the newest messages evomsgd's instance sent to
        `remote_jid`; `data` is a tuple of StoredMessage. A look-up, so never a send: a failure
        (Evolution down, a server without the route) only says it could not tell."""
        answer = await self._call(
            "POST", self._url("chat", "findMessages", instance), find_messages_body(remote_jid)
        )
        return (
            dataclasses.replace(answer, data=parse_messages(answer.data)) if answer.ok else answer
        )

    async def find_status(self, instance: str, key_id: str, remote_jid: str | None) -> Answer:
        """`POST /chat/findStatusMessage/{instance}`: the highest status Evolution stored for one
        message we sent (`data`: a STATUS_RANK name or None). A look-up: never raises."""
        answer = await self._call(
            "POST",
            self._url("chat", "findStatusMessage", instance),
            find_status_body(key_id, remote_jid),
        )
        return (
            dataclasses.replace(answer, data=parse_status_updates(answer.data, key_id))
            if answer.ok
            else answer
        )

    async def server_info(self) -> ServerInfo:
        """`GET /` without the key: is Evolution there, and which version; never raises."""
        try:
            status, body = await self._get(URL(self._base + "/", encoded=True), with_key=False)
        except Exception as exc:
            outcome = classify_exception(exc, sent=False)
            return ServerInfo(False, None, self._scrub(outcome.reason))
        data = loads(body)
        if status == 200 and isinstance(data, dict):
            version = data.get("version")
            version = version if isinstance(version, str) and version else None
            if version is None:
                return ServerInfo(True, None, "Evolution is reachable but did not say its version")
            return ServerInfo(True, version, f"Evolution {version} is reachable")
        if status == 200:
            return ServerInfo(
                False,
                None,
                "the server at EVOLUTION_API_URL does not answer like Evolution API - check "
                "the URL",
            )
        return ServerInfo(False, None, self._scrub(classify_response(status, body).reason))


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _splice(fields: dict[str, Any], media: str) -> bytes:
    """`fields` as a JSON object with `"media": media` added. A file in base64 needs no JSON
    escaping and is copied in as it is: json.dumps would scan megabytes holding the GIL (half a
    second for 16 MiB on a busy machine), stalling the event loop even from a thread. A URL goes
    through json."""
    raw = media.encode()
    quoted = not raw.translate(None, _BASE64_ALPHABET)
    value = b'"' + raw + b'"' if quoted else json.dumps(media).encode()
    return json.dumps(fields).encode()[:-1] + b', "media": ' + value + b"}"


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    length = resp.content_length
    if length is not None and length <= _MAX_BODY:
        # Evolution's answers say their length: read in one call, not chunk by chunk.
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_BODY:
            break
    return b"".join(chunks)[:_MAX_BODY]


class SandboxClient:
    """A `Sender` that touches no network: every send "succeeds" with a SANDBOX- key."""

    def __repr__(self) -> str:
        return "SandboxClient()"

    async def send_text(
        self, instance: str, number: str, text: str, *, delay: float = 0.0
    ) -> SendOutcome:
        """Pretend to send (at once: nobody watches a sandbox type); returns SENT with a fresh
        SANDBOX- key id."""
        jid = number if "@" in number else f"{number}@s.whatsapp.net"
        key_id = "SANDBOX-" + secrets.token_hex(10).upper()
        logger.debug("sandbox: not sending to %s via %s (key %s)", number, instance, key_id)
        return SendOutcome(OutcomeKind.SENT, "sandbox: not sent", key_id=key_id, remote_jid=jid)

    async def send_media(self, instance: str, number: str, media: OutgoingMedia) -> SendOutcome:
        """Record a media send without sending it: SENT with a fresh SANDBOX- key id."""
        logger.debug("sandbox: not sending %r to %s via %s", media, number, instance)
        return await self.send_text(instance, number, media.caption)

    async def connection_state(self, instance: str) -> StateProbe:
        """Every sandbox instance is open."""
        return StateProbe(InstanceState.OPEN, None, "sandbox: always open")

    async def find_messages(self, instance: str, remote_jid: str) -> Answer:
        """The sandbox keeps no messages to look up: it cannot tell."""
        return Answer(False, reason="sandbox: no server is contacted")

    async def find_status(self, instance: str, key_id: str, remote_jid: str | None) -> Answer:
        """The sandbox keeps no statuses to look up: it cannot tell."""
        return Answer(False, reason="sandbox: no server is contacted")

    async def server_info(self) -> ServerInfo:
        """The sandbox is always reachable, version "sandbox"."""
        return ServerInfo(True, "sandbox", "sandbox: no server is contacted")
