"""The pure rules for Evolution's answers to calls other than a send: webhooks (`webhook/find`)
and the look-ups - `findMessages` (was an ambiguous send stored after all?) and
`findStatusMessage` (what became of a message on an instance without webhooks). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evomsgd import clock
from evomsgd.evolution.outcomes import EVOLUTION_CHANNEL, OutcomeKind, SendOutcome

# --- webhooks and look-ups (pure) -----------------------------------------------------------

# The events evomsgd needs (shared/evolution-api.md "Configure: one webhook per instance").
WEBHOOK_EVENTS = ("SEND_MESSAGE", "MESSAGES_UPDATE", "CONNECTION_UPDATE")


@dataclass(frozen=True, slots=True)
class Answer:
    """An Evolution call other than a send: its parsed body when it succeeded, else why not."""

    ok: bool
    data: Any = None
    reason: str = ""
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """An instance's one webhook as `webhook/find` reports it. `headers` can hold a secret:
    never print it."""

    url: str
    enabled: bool
    events: tuple[str, ...]
    headers: dict[str, str]


def parse_webhook(data: Any) -> WebhookConfig | None:
    """`webhook/find`'s body (v2 row, or v1's flat object); None when none is set (`null`)."""
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not data["url"]:
        return None
    events = data.get("events")
    headers = data.get("headers")
    return WebhookConfig(
        data["url"],
        data.get("enabled") is True,
        tuple(e for e in events if isinstance(e, str)) if isinstance(events, list) else (),
        {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {},
    )


# --- looking a send up (pure) ----------------------------------------------------------------

# Evolution stamps a message with its own host's clock, in whole seconds; evomsgd's attempt start
# is its own. Two hosts kept by NTP agree far better than this, but a VM or container without it
# drifts; a wider window costs little because the text must match exactly, and the keys evomsgd
# recorded for its other messages are never taken.
LOOKUP_CLOCK_SKEW = 60.0
# The newest messages to the recipient asked for in one look-up (one page of findMessages). A
# recipient of transactional messages gets a handful in the minutes a look-up spans.
LOOKUP_PAGE = 50


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message Evolution stored (a `findMessages` record), as far as a look-up needs it."""

    key_id: str
    remote_jid: str | None
    from_me: bool
    text: str | None
    at: float | None  # messageTimestamp, seconds since the epoch


def recipient_jid(number: str, integration: str | None = None) -> str:
    """The `key.remoteJid` Evolution stores for a send to `number` (digits or a JID): the
    EVOLUTION channel keeps the number as sent, Baileys the user's JID. Numbers Evolution
    rewrites (Mexico's 521, Brazil's 9th digit) get another JID: such a look-up finds nothing."""
    if "@" in number or integration == EVOLUTION_CHANNEL:
        return number
    return number + "@s.whatsapp.net"


# findStatusMessage's statuses, lowest to highest (renderStatus.ts; Baileys' numbering).
STATUS_RANK = ("ERROR", "PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED")


def find_status_body(key_id: str, remote_jid: str | None) -> dict[str, Any]:
    """`POST /chat/findStatusMessage` body: the stored updates of one message we sent."""
    where: dict[str, Any] = {"id": key_id}
    if remote_jid:
        where["remoteJid"] = remote_jid
    return {"where": where, "offset": 50, "page": 1}


def parse_status_updates(data: Any, key_id: str) -> str | None:
    """The highest status among `findStatusMessage`'s updates of `key_id` (a bare array in no set
    order), a name of STATUS_RANK; None when it stored none. A delivery outranks an ERROR."""
    if not isinstance(data, list):
        return None
    found = [
        row["status"]
        for row in data
        if isinstance(row, dict)
        and row.get("keyId") == key_id
        and row.get("status") in STATUS_RANK
        and row.get("fromMe") is not False
    ]
    return max(found, key=STATUS_RANK.index) if found else None


def find_messages_body(remote_jid: str) -> dict[str, Any]:
    """`POST /chat/findMessages` body: the newest page of our own messages to one JID."""
    return {"where": {"key": {"remoteJid": remote_jid, "fromMe": True}}, "offset": LOOKUP_PAGE}


def _text_of(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    if isinstance(message.get("conversation"), str):
        return str(message["conversation"])
    extended = message.get("extendedTextMessage")
    if isinstance(extended, dict) and isinstance(extended.get("text"), str):
        return str(extended["text"])
    # A media message (issue 16) is told by its caption; one without a caption cannot be told
    # from another, so it is never found (and is sent again, flagged).
    for kind in _MEDIA_MESSAGES:
        media = message.get(kind)
        if isinstance(media, dict) and isinstance(media.get("caption"), str) and media["caption"]:
            return str(media["caption"])
    return None


_MEDIA_MESSAGES = ("imageMessage", "documentMessage", "videoMessage", "audioMessage")


def _timestamp(value: Any) -> float | None:
    # v2 answers a number, v1 a string of one; a Long from protobuf sometimes an object.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.strip().isdigit():
        return float(value.strip())
    if isinstance(value, dict) and isinstance(value.get("low"), int):
        return float(value["low"] & 0xFFFFFFFF)
    return None


def parse_messages(data: Any) -> tuple[StoredMessage, ...]:
    """`findMessages`'s answer (v2 `{"messages": {"records": [...]}}`, or a bare list) as the
    messages it holds; records without a usable key are left out."""
    records: Any = data
    if isinstance(data, dict):
        messages = data.get("messages")
        records = messages.get("records") if isinstance(messages, dict) else messages
    if not isinstance(records, list):
        return ()
    found: list[StoredMessage] = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
            continue
        key = record["key"]
        key_id, jid = key.get("id"), key.get("remoteJid")
        if not isinstance(key_id, str) or not key_id.strip():
            continue
        found.append(
            StoredMessage(
                key_id.strip(),
                jid if isinstance(jid, str) else None,
                key.get("fromMe") is True,
                _text_of(record.get("message")),
                _timestamp(record.get("messageTimestamp")),
            )
        )
    return tuple(found)


def match_sent(
    messages: Iterable[StoredMessage], text: str, started: float, taken: Iterable[str] = ()
) -> tuple[StoredMessage, ...]:
    """The stored messages that are this send: ours, with exactly this text, stamped no earlier
    than LOOKUP_CLOCK_SKEW before `started` (when the first attempt that may have sent it began),
    and not a key evomsgd recorded for another message; oldest first. A message without a
    timestamp cannot be placed in time and is not taken."""
    since = started - LOOKUP_CLOCK_SKEW
    other = set(taken)
    matches = [
        m
        for m in messages
        if m.from_me
        and m.text == text
        and m.at is not None
        and m.at >= since
        and m.key_id not in other
    ]
    return tuple(sorted(matches, key=lambda m: (m.at or 0.0, m.key_id)))


def found_outcome(matches: tuple[StoredMessage, ...], *, elapsed: float = 0.0) -> SendOutcome:
    """FOUND for the look-up that found `matches` (not empty): the oldest is the send."""
    first = matches[0]
    reason = (
        f"Evolution already has it (key {first.key_id}, stored at "
        f"{clock.to_rfc3339(first.at or 0.0)}): an earlier attempt sent it and its answer was "
        "lost - not sent again"
    )
    if len(matches) > 1:
        reason += f"; Evolution holds {len(matches)} copies"
    return SendOutcome(
        OutcomeKind.FOUND,
        reason,
        key_id=first.key_id,
        remote_jid=first.remote_jid,
        elapsed=elapsed,
        copies=len(matches),
    )
