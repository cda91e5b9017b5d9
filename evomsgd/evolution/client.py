"""The only module that speaks HTTP to Evolution API: one call in, one typed outcome out.

Every answer or failure is mapped to an `OutcomeKind` following the error table in
`shared/evolution-api.md`. The mapping lives in two pure functions (`classify_response`,
`classify_exception`) so it can be tested and fuzzed without a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import aiohttp
from yarl import URL

from evomsgd.log import log_fields

__all__ = [
    "EvolutionClient",
    "InstanceState",
    "OutcomeKind",
    "SandboxClient",
    "SendOutcome",
    "Sender",
    "ServerInfo",
    "StateProbe",
    "classify_exception",
    "classify_response",
]

logger = logging.getLogger("evomsgd.evolution")

DETAIL_LIMIT = 300
# Evolution's answers are a few hundred bytes; a cap keeps a misconfigured URL that points at
# something large from being read into memory in full.
_MAX_BODY = 256 * 1024
# Health probes run every 30-60 s; waiting the full send timeout (sized for WhatsApp's slow
# number lookup) would only delay the verdict.
_PROBE_TIMEOUT = 10.0
# Scrubbing a very short key would mangle ordinary words in reasons; such a key is a
# misconfiguration anyway and reveals nothing when it shows up inside prose.
_MIN_SCRUB_LEN = 4
# Connection: close on every call. A pooled keep-alive connection can be closed by Evolution
# (node's 5 s idle timeout) just as we reuse it, and a POST is never retried, so the send would
# look ambiguous although nothing went out. Leaving no idle connection behind keeps AMBIGUOUS
# meaningful; a handshake per send costs nothing at WhatsApp's pace.
_HEADERS = {"Accept": "application/json", "Connection": "close"}


class OutcomeKind(enum.StrEnum):
    """What happened to one send, in the terms the delivery queue acts on."""

    SENT = "sent"
    SENT_UNCONFIRMED = "sent_unconfirmed"
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    UPSTREAM_DOWN = "upstream_down"
    CONFIG_ERROR = "config_error"
    UNKNOWN_INSTANCE = "unknown_instance"
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """The verdict on one send; `reason` is for an operator and never holds the API key."""

    kind: OutcomeKind
    reason: str
    http_status: int | None = None
    key_id: str | None = None
    remote_jid: str | None = None
    detail: str | None = None
    elapsed: float = 0.0


class InstanceState(enum.StrEnum):
    """Connection state of an Evolution instance as `connectionState` reports it."""

    OPEN = "open"
    CONNECTING = "connecting"
    CLOSE = "close"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class StateProbe:
    """Result of a state probe; `kind` is None when Evolution reported a state."""

    state: InstanceState
    kind: OutcomeKind | None
    reason: str
    http_status: int | None = None  # tells a rejected key (401) from other config errors


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Result of `GET /`: whether Evolution answered like Evolution, and its version."""

    reachable: bool
    version: str | None
    reason: str

    @property
    def major(self) -> int | None:
        """Major version number (1 or 2 pick the send body), None when unknown."""
        head = (self.version or "").lstrip("vV").split(".", 1)[0]
        return int(head) if head.isdigit() else None


@runtime_checkable
class Sender(Protocol):
    """What the queue needs from a client: the real one or the sandbox."""

    async def send_text(self, instance: str, number: str, text: str) -> SendOutcome: ...

    async def connection_state(self, instance: str) -> StateProbe: ...

    async def server_info(self) -> ServerInfo: ...


# --- parsing Evolution's answers -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """The parts of an error body that decide the outcome, whatever shape they came in."""

    texts: tuple[str, ...]  # every string found in response.message, flattened
    missing: tuple[str, ...]  # numbers reported with exists: false
    nested: bool  # message was a list of lists: JSON-schema validation
    label: str  # the `error` field
    code: str  # top-level `code` (LICENSE_REQUIRED)
    raw: str  # body as text, for a detail when no message was found


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    # RecursionError: deeply nested arrays are valid JSON but blow the parser's stack.
    except (ValueError, RecursionError):
        return None


def _flatten(message: Any, texts: list[str], missing: list[str], depth: int = 0) -> bool:
    """Collect strings and not-on-WhatsApp numbers; True when a nested list was seen."""
    nested = False
    if depth > 8:
        return nested
    if isinstance(message, str):
        texts.append(message)
    elif isinstance(message, list):
        for item in message:
            if isinstance(item, list):
                nested = True
            nested = _flatten(item, texts, missing, depth + 1) or nested
    elif isinstance(message, dict):
        if message.get("exists") is False:
            who = message.get("number") or message.get("jid")
            missing.append(who if isinstance(who, str) else "?")
        elif isinstance(message.get("message"), str):
            texts.append(message["message"])
    return nested


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _envelope(body: bytes) -> _Envelope:
    data = _loads(body)
    texts: list[str] = []
    missing: list[str] = []
    nested = False
    label = code = ""
    if isinstance(data, dict):
        response = data.get("response")
        if isinstance(response, dict) and "message" in response:
            message: Any = response["message"]
        else:
            message = data.get("message")
        nested = _flatten(message, texts, missing)
        label = _str(data.get("error"))
        code = _str(data.get("code"))
    elif data is not None:
        nested = _flatten(data, texts, missing)
    raw = " ".join(body[: DETAIL_LIMIT * 4].decode("utf-8", "replace").split())
    return _Envelope(tuple(texts), tuple(missing), nested, label, code, raw)


def _excerpt(env: _Envelope) -> str | None:
    if env.missing:
        text = "not on WhatsApp: " + ", ".join(env.missing)
    elif env.texts:
        text = "; ".join(" ".join(t.split()) for t in env.texts)
    else:
        text = env.raw
    return _clip(text) or None


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _has(env: _Envelope, needles: tuple[str, ...]) -> bool:
    return any(n in t.lower() for t in env.texts for n in needles)


_K = OutcomeKind
_MAYBE_SENT = "may have been sent; check before resending"

# Known messages, first match wins; mirrors the error table in shared/evolution-api.md.
# (HTTP status, lower-case substrings of response.message, kind, reason)
_MESSAGE_RULES: tuple[tuple[int, tuple[str, ...], OutcomeKind, str], ...] = (
    (400, ("rate-overlimit",), _K.RATE_LIMITED,
     "WhatsApp rate limit hit (400 rate-overlimit) - slow this instance down, retry later"),
    (400, ('requires property "textmessage"',), _K.CONFIG_ERROR,
     "Evolution expects the v1 body (400) - the server is 1.x; set the API version to 1"),
    # Baileys socket/session failures rethrown as 400 "Error: ...": nothing went out.
    (400, ("connection closed", "timed out", "sessionerror", "no sessions", "connection lost",
           "connection terminated", "connection failure", "stream errored"), _K.TRANSIENT,
     "WhatsApp connection trouble while sending (400) - retry later"),
    (400, ("text is required",), _K.PERMANENT, "Evolution rejected a blank text (400)"),
    (404, ("instance does not exist",), _K.UNKNOWN_INSTANCE,
     "Evolution has no such instance (404) - check the instance name"),
    (500, ("not allowed by cors",), _K.CONFIG_ERROR,
     "Evolution refused the request by its CORS settings (500) - set CORS_ORIGIN=* there"),
    (500, ("reading 'onwhatsapp'",), _K.UPSTREAM_DOWN,
     "the instance is not connected to WhatsApp (500) - pair it with the QR code in Evolution"),
    (500, ("reading 'textmessage'",), _K.TRANSIENT,
     "the instance is still loading (500) - retry shortly"),
    (500, ("connection closed", "timed out"), _K.TRANSIENT,
     "WhatsApp connection trouble during the number check (500) - retry later"),
)  # fmt: skip

# Fallbacks when the message says nothing more specific.
_STATUS_RULES: dict[int, tuple[OutcomeKind, str]] = {
    401: (_K.CONFIG_ERROR, "Evolution rejected the API key (401) - check EVOLUTION_API_KEY"),
    403: (_K.CONFIG_ERROR, "Evolution refused access (403) - check EVOLUTION_API_KEY"),
    404: (_K.CONFIG_ERROR, "Evolution has no such route (404) - check EVOLUTION_API_URL"),
    405: (_K.CONFIG_ERROR, "Evolution refused the method (405) - check EVOLUTION_API_URL"),
    408: (_K.TRANSIENT, "Evolution timed out reading the request (408) - retry later"),
    429: (_K.RATE_LIMITED, "rate limited in front of Evolution (429) - retry later"),
    502: (_K.AMBIGUOUS, f"a proxy in front of Evolution answered 502 - {_MAYBE_SENT}"),
    504: (_K.AMBIGUOUS, f"a proxy in front of Evolution answered 504 - {_MAYBE_SENT}"),
}


def _key(data: Any) -> tuple[str, str | None] | None:
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
        return None
    key_id, jid = data["key"].get("id"), data["key"].get("remoteJid")
    if not isinstance(key_id, str) or not key_id.strip():
        return None
    return key_id.strip(), jid if isinstance(jid, str) and jid else None


def classify_response(status: int, body: bytes, *, elapsed: float = 0.0) -> SendOutcome:
    """Map one HTTP answer from Evolution to an outcome; pure, never raises."""
    try:
        if status == 201 and (key := _key(_loads(body))) is not None:
            return SendOutcome(
                _K.SENT, "handed to WhatsApp (201)", status, key[0], key[1], elapsed=elapsed
            )
        env = _envelope(body)
        kind, reason = _verdict(status, env)
        return SendOutcome(kind, reason, status, detail=_excerpt(env), elapsed=elapsed)
    except Exception as exc:  # a parser bug must not lose the verdict on a send
        logger.exception("could not classify Evolution answer (HTTP %s)", status)
        detail = _clip(f"{type(exc).__name__}: {exc}")
        reason = f"could not read Evolution's answer (HTTP {status}) - {_MAYBE_SENT}"
        return SendOutcome(_K.AMBIGUOUS, reason, status, detail=detail, elapsed=elapsed)


def _verdict(status: int, env: _Envelope) -> tuple[OutcomeKind, str]:
    if status == 201:
        return _K.AMBIGUOUS, f"Evolution answered 201 without a message id - {_MAYBE_SENT}"
    if 200 <= status < 300:
        return _K.AMBIGUOUS, f"Evolution answered {status} instead of 201 - {_MAYBE_SENT}"
    if env.code == "LICENSE_REQUIRED":
        return _K.CONFIG_ERROR, (
            f"Evolution wants licence activation ({status} LICENSE_REQUIRED) - activate it "
            "or run a 2.3.x release"
        )
    if 300 <= status < 400:
        return _K.CONFIG_ERROR, f"Evolution redirected ({status}) - check EVOLUTION_API_URL"
    if status == 400:
        if any(t.lstrip().startswith("PrismaClient") for t in env.texts):
            return _K.SENT_UNCONFIRMED, (
                "WhatsApp accepted the message but Evolution failed to save it (400 "
                "PrismaClient) - do not resend; there is no message id"
            )
        if env.missing:
            return _K.PERMANENT, f"{', '.join(env.missing)} is not on WhatsApp (400)"
    for rule_status, needles, kind, reason in _MESSAGE_RULES:
        if status == rule_status and _has(env, needles):
            return kind, reason
    if status == 400:
        if env.nested:
            return _K.PERMANENT, (
                "Evolution rejected the request body (400 schema validation) - bad input or a "
                "bug in evomsgd"
            )
        if env.label == "Internal Server Error":
            return _K.PERMANENT, "Evolution could not parse the request (400 malformed JSON)"
        if any(t.lstrip().startswith("Error:") for t in env.texts):
            # Evolution rethrows any Baileys failure during the send as 400 "Error: ...";
            # ones not listed above are still socket-side, so a later attempt can succeed.
            return _K.TRANSIENT, "WhatsApp failed to send (400) - retry later"
    if status in _STATUS_RULES:
        return _STATUS_RULES[status]
    if 400 <= status < 500:
        return _K.PERMANENT, f"Evolution rejected the request ({status})"
    if 500 <= status < 600:
        return _K.TRANSIENT, f"Evolution server error ({status}) - retry later"
    return _K.AMBIGUOUS, f"unexpected HTTP status {status} from Evolution - {_MAYBE_SENT}"


# --- network failures ------------------------------------------------------------------------

# Raised while connecting, so the request cannot have reached Evolution.
_BEFORE_SEND: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # incl. DNS, SSL and certificate errors, proxy connect
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerFingerprintMismatch,
)


def _may_have_sent(exc: BaseException) -> bool:
    return not isinstance(exc, (*_BEFORE_SEND, aiohttp.InvalidURL))


def classify_exception(exc: BaseException, *, sent: bool, elapsed: float = 0.0) -> SendOutcome:
    """Map a failed call to an outcome; `sent` says whether the request may have gone out."""
    detail = _clip(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    after = f" after {elapsed:.1f} s" if elapsed else ""

    def out(kind: OutcomeKind, reason: str) -> SendOutcome:
        return SendOutcome(kind, reason, None, detail=detail, elapsed=elapsed)

    if isinstance(exc, aiohttp.InvalidURL):
        return out(OutcomeKind.CONFIG_ERROR, "invalid Evolution URL - check EVOLUTION_API_URL")
    if not sent or isinstance(exc, _BEFORE_SEND):
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            why = "cannot resolve Evolution's host name - check EVOLUTION_API_URL and DNS"
        elif isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
            why = "TLS handshake with Evolution failed - check its certificate and the URL scheme"
        elif isinstance(exc, asyncio.TimeoutError):
            why = f"timed out connecting to Evolution{after} - is it running and reachable?"
        else:
            why = "cannot connect to Evolution - is it running? check EVOLUTION_API_URL"
        return out(OutcomeKind.UPSTREAM_DOWN, why)
    if isinstance(exc, asyncio.TimeoutError):
        why = f"no answer from Evolution{after} - the message may have been sent"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        why = "Evolution closed the connection without answering - the message may have been sent"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        why = "Evolution's answer was cut off - the message may have been sent"
    else:
        why = "the connection to Evolution failed mid-request - the message may have been sent"
    return out(OutcomeKind.AMBIGUOUS, why + "; check before resending")


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
        return dataclasses.replace(outcome, reason=self._scrub(outcome.reason), detail=detail)

    def _body(self, number: str, text: str) -> dict[str, Any]:
        if self._api_version == 1:
            return {
                "number": number,
                "textMessage": {"text": text},
                "options": {"delay": 0, "linkPreview": False},
            }
        # No `delay`: the server would hold the request open that long; evomsgd paces itself.
        return {"number": number, "text": text, "linkPreview": False}

    async def send_text(self, instance: str, number: str, text: str) -> SendOutcome:
        """POST one text; every HTTP or network problem comes back as an outcome."""
        started = time.monotonic()
        outcome = self._scrub_outcome(await self._send(instance, number, text, started))
        # Our v1 body sent to a v2 server fails its schema on the missing "text".
        if (
            self._api_version == 1
            and outcome.kind is OutcomeKind.PERMANENT
            and 'requires property "text"' in (outcome.detail or "")
        ):
            outcome = dataclasses.replace(
                outcome,
                kind=OutcomeKind.CONFIG_ERROR,
                reason="Evolution expects the v2 message body (400) - the server is 2.x; "
                "set the API version to 2",
            )
        self._log(instance, number, outcome)
        return outcome

    async def _send(self, instance: str, number: str, text: str, started: float) -> SendOutcome:
        url = self._url("message", "sendText", instance)
        headers = {**_HEADERS, "apikey": self._api_key}
        timeout = aiohttp.ClientTimeout(total=self._timeout, connect=min(10.0, self._timeout))
        logger.debug(
            "sending to %s via instance %s", number, instance, extra=log_fields(instance=instance)
        )
        try:
            async with self._session.post(
                url,
                json=self._body(number, text),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                body = await _read_capped(resp)
                return classify_response(resp.status, body, elapsed=time.monotonic() - started)
        except Exception as exc:  # never raise to the queue; CancelledError still propagates
            elapsed = time.monotonic() - started
            if not isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
                logger.exception(
                    "unexpected error sending via instance %s",
                    instance,
                    extra=log_fields(instance=instance),
                )
            return classify_exception(exc, sent=_may_have_sent(exc), elapsed=elapsed)

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
            if not _may_have_sent(exc):
                reason = classify_exception(exc, sent=False).reason
                return StateProbe(InstanceState.UNKNOWN, OutcomeKind.UPSTREAM_DOWN, reason)
            # A probe is safe to repeat: a failure after sending is only "try again".
            reason = f"Evolution did not answer the state probe ({type(exc).__name__})"
            return StateProbe(InstanceState.UNKNOWN, OutcomeKind.TRANSIENT, reason)
        if status == 200:
            state = _state(_loads(body))
            if state is None:
                return StateProbe(
                    InstanceState.UNKNOWN,
                    OutcomeKind.TRANSIENT,
                    "Evolution answered the state probe without a recognisable state",
                )
            return StateProbe(state, None, _STATE_REASONS[state].format(instance=instance), status)
        outcome = classify_response(status, body)
        kind = outcome.kind
        if kind not in (
            OutcomeKind.UPSTREAM_DOWN,
            OutcomeKind.CONFIG_ERROR,
            OutcomeKind.UNKNOWN_INSTANCE,
        ):
            kind = OutcomeKind.TRANSIENT
        return StateProbe(InstanceState.UNKNOWN, kind, self._scrub(outcome.reason), status)

    async def server_info(self) -> ServerInfo:
        """`GET /` without the key: is Evolution there, and which version; never raises."""
        try:
            status, body = await self._get(URL(self._base + "/", encoded=True), with_key=False)
        except Exception as exc:
            outcome = classify_exception(exc, sent=False)
            return ServerInfo(False, None, self._scrub(outcome.reason))
        data = _loads(body)
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


_STATE_REASONS = {
    InstanceState.OPEN: "instance {instance} is connected to WhatsApp",
    InstanceState.CONNECTING: "instance {instance} is connecting (pairing or reconnecting)",
    InstanceState.CLOSE: "instance {instance} is not connected to WhatsApp - pair it in Evolution",
}


def _state(data: Any) -> InstanceState | None:
    # v2 nests the state under "instance"; some v1 builds answer it at the top level.
    holder = data.get("instance") if isinstance(data, dict) else None
    if not isinstance(holder, dict):
        holder = data if isinstance(data, dict) else {}
    value = holder.get("state")
    if isinstance(value, str) and value in ("open", "connecting", "close"):
        return InstanceState(value)
    return None


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
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

    async def send_text(self, instance: str, number: str, text: str) -> SendOutcome:
        """Pretend to send; returns SENT with a fresh SANDBOX- key id."""
        jid = number if "@" in number else f"{number}@s.whatsapp.net"
        key_id = "SANDBOX-" + secrets.token_hex(10).upper()
        logger.debug("sandbox: not sending to %s via %s (key %s)", number, instance, key_id)
        return SendOutcome(OutcomeKind.SENT, "sandbox: not sent", key_id=key_id, remote_jid=jid)

    async def connection_state(self, instance: str) -> StateProbe:
        """Every sandbox instance is open."""
        return StateProbe(InstanceState.OPEN, None, "sandbox: always open")

    async def server_info(self) -> ServerInfo:
        """The sandbox is always reachable, version "sandbox"."""
        return ServerInfo(True, "sandbox", "sandbox: no server is contacted")
