"""What Evolution's answers mean: pure rules that turn one HTTP answer or network failure into a
typed outcome (sent / permanent / transient / upstream-down / config error / ambiguous). No I/O.

The mapping follows the error table in `shared/evolution-api.md`; being pure, it is tested and
fuzzed without a server (`classify_response`, `classify_exception`, `parse_state`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

logger = logging.getLogger("evomsgd.evolution")

DETAIL_LIMIT = 300


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
    # Not a send: a look-up before resending an ambiguous one found that Evolution has it.
    FOUND = "found"


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
    # What the answer says of the instance's connection, when it says anything: Evolution's
    # "reading 'onWhatsApp'" 500 means the instance is not paired (CLOSE), not that Evolution is
    # down, so the lane pauses in the state a probe would report and the two agree.
    instance_state: InstanceState | None = None
    # The numbers WhatsApp said it does not know (400 ... exists: false): worth remembering, so
    # they are not asked about again (mass number checks are themselves a ban signal).
    not_on_whatsapp: tuple[str, ...] = ()
    # SENT: the instance's Evolution integration as its 201 shows it (`integration_of`).
    integration: str | None = None
    # FOUND: how many unrecorded copies of the text Evolution holds (more than one: a duplicate).
    copies: int = 0


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


def loads(body: bytes) -> Any:
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
    data = loads(body)
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

# An unpaired instance fails its sendText at the number check (onWhatsApp) and its sendMedia at
# the upload to WhatsApp, which comes first (waUploadToServer).
_NOT_PAIRED = ("reading 'onwhatsapp'", "reading 'wauploadtoserver'")

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
    # sendMedia's own checks (sendMessage.controller.ts): nothing was uploaded or sent.
    (400, ("owned media must be a url or base64",), _K.PERMANENT,
     "Evolution refused the media: neither a URL it accepts nor base64 (400)"),
    (400, ("for base64 the file name must be informed",), _K.PERMANENT,
     "Evolution refused a base64 document without a file name (400)"),
    (400, ('requires property "mediamessage"',), _K.CONFIG_ERROR,
     "Evolution expects the v1 media body (400) - the server is 1.x; set the API version to 1"),
    (404, ("instance does not exist",), _K.UNKNOWN_INSTANCE,
     "Evolution has no such instance (404) - check the instance name"),
    (500, ("not allowed by cors",), _K.CONFIG_ERROR,
     "Evolution refused the request by its CORS settings (500) - set CORS_ORIGIN=* there"),
    (500, _NOT_PAIRED, _K.UPSTREAM_DOWN,
     "the instance is not connected to WhatsApp (500) - pair it with the QR code in Evolution"),
    (500, ("reading 'textmessage'",), _K.TRANSIENT,
     "the instance is still loading (500) - retry shortly"),
    (500, ("connection closed", "timed out"), _K.TRANSIENT,
     "WhatsApp connection trouble during the number check (500) - retry later"),
    (500, ("media upload failed",), _K.TRANSIENT,
     "uploading the media to WhatsApp failed (500) - retry later"),
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


# Evolution's integration types, as far as receipts go: Baileys reports WhatsApp's acks
# (messages.update); the EVOLUTION channel emits only send.message, so its messages never get
# past accepted and must not be flagged unconfirmed.
BAILEYS = "WHATSAPP-BAILEYS"
EVOLUTION_CHANNEL = "EVOLUTION"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def integration_of(data: Any) -> str | None:
    """The instance's integration as a send's 201 shows it; None when the body does not tell.

    Read from the answer evomsgd gets anyway (no extra call): an EVOLUTION-channel instance
    answers without `status` and with a UUID `key.id` (captured on 2.3.7); Baileys (v1 and v2)
    always says `status` ("PENDING") and uses WhatsApp's hex ids."""
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
        return None
    key_id = data["key"].get("id")
    if "status" in data:
        return BAILEYS
    if isinstance(key_id, str) and _UUID.fullmatch(key_id.strip()):
        return EVOLUTION_CHANNEL
    return None


def classify_response(status: int, body: bytes, *, elapsed: float = 0.0) -> SendOutcome:
    """Map one HTTP answer from Evolution to an outcome; pure, never raises."""
    try:
        if status == 201 and (key := _key(data := loads(body))) is not None:
            return SendOutcome(
                _K.SENT,
                "handed to WhatsApp (201)",
                status,
                key[0],
                key[1],
                elapsed=elapsed,
                integration=integration_of(data),
            )
        env = _envelope(body)
        kind, reason = _verdict(status, env)
        paired = kind is _K.UPSTREAM_DOWN and status == 500 and _has(env, _NOT_PAIRED)
        return SendOutcome(
            kind,
            reason,
            status,
            detail=_excerpt(env),
            elapsed=elapsed,
            instance_state=InstanceState.CLOSE if paired else None,
            not_on_whatsapp=env.missing if status == 400 and kind is _K.PERMANENT else (),
        )
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


def may_have_sent(exc: BaseException) -> bool:
    return not isinstance(exc, (*_BEFORE_SEND, aiohttp.InvalidURL))


def never_written(exc: BaseException) -> bool:
    """True when a send failed because its connection was already closing as the request was to
    be written: aiohttp refused to write (`Cannot write to closing transport`, wrapped as
    `Can not write request body`), so not a byte left. Only for a request whose headers and body
    go out in one write, as a sendText JSON body does; then a retry on a new connection is safe.
    """
    cause = exc.__cause__
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and isinstance(cause, aiohttp.ClientConnectionResetError)
        and str(cause) == "Cannot write to closing transport"
    )


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


STATE_REASONS = {
    InstanceState.OPEN: "instance {instance} is connected to WhatsApp",
    InstanceState.CONNECTING: "instance {instance} is connecting (pairing or reconnecting)",
    InstanceState.CLOSE: "instance {instance} is not connected to WhatsApp - pair it in Evolution",
}


def parse_state(data: Any) -> InstanceState | None:
    # v2 nests the state under "instance"; some v1 builds answer it at the top level.
    holder = data.get("instance") if isinstance(data, dict) else None
    if not isinstance(holder, dict):
        holder = data if isinstance(data, dict) else {}
    value = holder.get("state")
    if isinstance(value, str) and value in ("open", "connecting", "close"):
        return InstanceState(value)
    return None
