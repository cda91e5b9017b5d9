"""Delivery receipts in the ledger: a message's delivery state, receipts waiting for their send's
outcome, the webhook secret's hash, and when each instance's webhook was last heard.

The `..._in(cur, ...)` functions run inside the caller's transaction (the group committer's);
the others read, or write the rare operator changes (a new secret) in a transaction of their own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from evomsgd import clock
from evomsgd.ledger.database import Database
from evomsgd.ledger.records import Receipt, ReceiptResult
from evomsgd.models import DELIVERY_AT, DELIVERY_RANK, Delivery

# Evolution's integration that emits no receipts (evolution.outcomes.EVOLUTION_CHANNEL; the
# ledger imports nothing of evolution/, so the name is spelled here and a test ties the two).
EVOLUTION_CHANNEL = "EVOLUTION"
# How far back failed receipts count towards EVOMSGD_DELIVERY_ERRORS_PAUSE.
FAILURE_WINDOW = 600.0
SECRET_NAME = "evolution"
FAILED_DETAIL = (
    "WhatsApp reported status ERROR for this message (Evolution gives no reason): it was not "
    "delivered"
)


def _rank(state: str | None) -> int:
    return DELIVERY_RANK[Delivery(state)] if state is not None else 0


def apply_in(cur: sqlite3.Cursor, receipt: Receipt) -> ReceiptResult:
    """Apply one receipt to its message, keep it for later (its send is still in flight: the
    webhook raced the 201), or drop it (not a message of ours)."""
    now_db = clock.to_db(receipt.at)
    heard_in(cur, receipt.instance, receipt.at)
    row = cur.execute(
        "SELECT id, delivery, created_at FROM messages WHERE instance = ? AND evolution_key = ?"
        " ORDER BY seq DESC LIMIT 1",
        (receipt.instance, receipt.evolution_key),
    ).fetchone()
    if row is None:
        in_flight = cur.execute(
            "SELECT 1 FROM messages WHERE instance = ? AND status = 'STARTED' LIMIT 1",
            (receipt.instance,),
        ).fetchone()
        if in_flight is None:
            return ReceiptResult("dropped")
        cur.execute(
            "INSERT INTO receipts_pending (instance, evolution_key, delivery, received_at)"
            " VALUES (?, ?, ?, ?)",
            (receipt.instance, receipt.evolution_key, receipt.delivery, now_db),
        )
        return ReceiptResult("pending")
    message_id, current, created_at = row
    if not _advance(cur, message_id, receipt.instance, current, receipt.delivery, now_db):
        return ReceiptResult("stale", message_id, current)
    failures = 0
    if receipt.delivery == Delivery.FAILED:
        failures = cur.execute(
            "SELECT count(*) FROM messages WHERE delivery = 'failed' AND instance = ?"
            " AND delivery_failed_at >= ?",
            (receipt.instance, clock.to_db(receipt.at - FAILURE_WINDOW)),
        ).fetchone()[0]
    since = max(0.0, receipt.at - clock.from_db(created_at))
    return ReceiptResult("applied", message_id, receipt.delivery, failures, since)


def _advance(
    cur: sqlite3.Cursor, message_id: str, instance: str, current: str | None, new: str, at: str
) -> bool:
    """Move a message's delivery state up to `new` (never down); False when it is not higher."""
    if _rank(new) <= _rank(current):
        return False
    state = Delivery(new)
    column = DELIVERY_AT[state]  # from a fixed table: not user input
    cur.execute(
        f"UPDATE messages SET delivery = ?, {column} = coalesce({column}, ?),"
        " delivery_error = ? WHERE id = ?",
        (new, at, FAILED_DETAIL if state is Delivery.FAILED else None, message_id),
    )
    cur.execute(
        "INSERT INTO events (message_id, at, instance, event, outcome, detail)"
        " VALUES (?, ?, ?, 'delivery', ?, ?)",
        (message_id, at, instance, new, FAILED_DETAIL if state is Delivery.FAILED else None),
    )
    return True


def accepted_in(
    cur: sqlite3.Cursor,
    message_id: str,
    instance: str,
    evolution_key: str | None,
    now: float,
    *,
    integration: str | None = None,
) -> list[str]:
    """A send's SUCCESS was recorded: its delivery state starts at accepted, the instance's
    integration (when the 201 showed it) is kept, and receipts that arrived before it are
    applied now. Returns the states they moved it to."""
    cur.execute(
        "UPDATE messages SET delivery = 'accepted' WHERE id = ? AND delivery IS NULL",
        (message_id,),
    )
    if integration is not None:
        # Written only when it changes (an instance re-created with another integration).
        cur.execute(
            "INSERT INTO lanes (instance, integration) VALUES (?, ?) ON CONFLICT (instance)"
            " DO UPDATE SET integration = excluded.integration"
            " WHERE integration IS NOT excluded.integration",
            (instance, integration),
        )
    if evolution_key is None:
        return []
    rows = cur.execute(
        "SELECT id, delivery, received_at FROM receipts_pending"
        " WHERE instance = ? AND evolution_key = ? ORDER BY id",
        (instance, evolution_key),
    ).fetchall()
    if not rows:
        return []
    moved: list[str] = []
    for _, state, received_at in rows:
        current = cur.execute(
            "SELECT delivery FROM messages WHERE id = ?", (message_id,)
        ).fetchone()[0]
        if _advance(cur, message_id, instance, current, state, received_at):
            moved.append(state)
    cur.execute(
        f"DELETE FROM receipts_pending WHERE id IN ({', '.join('?' * len(rows))})",
        [row[0] for row in rows],
    )
    return moved


def heard_in(cur: sqlite3.Cursor, instance: str, now: float) -> None:
    """Record that the instance's webhook reached evomsgd (any event)."""
    cur.execute(
        "INSERT INTO lanes (instance, last_webhook_at) VALUES (?, ?) ON CONFLICT (instance)"
        " DO UPDATE SET last_webhook_at = excluded.last_webhook_at",
        (instance, clock.to_db(now)),
    )


def mark_unconfirmed_in(
    cur: sqlite3.Cursor, now: float, ack_timeout: float, skip: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Accepted messages without a server ack for `ack_timeout` seconds become unconfirmed
    (instances in `skip` emit no receipts at all and are left alone); returns (id, instance)."""
    skipped = list(skip)
    sql = (
        "SELECT id, instance FROM messages WHERE delivery = 'accepted' AND finished_at <= ?"
        " AND sandbox = 0"
    )
    if skipped:
        sql += f" AND instance NOT IN ({', '.join('?' * len(skipped))})"
    rows = cur.execute(sql + " LIMIT 1000", [clock.to_db(now - ack_timeout), *skipped]).fetchall()
    now_db = clock.to_db(now)
    for message_id, instance in rows:
        _advance(cur, message_id, instance, Delivery.ACCEPTED, Delivery.UNCONFIRMED, now_db)
    return [(row[0], row[1]) for row in rows]


def silent_instances_in(cur: sqlite3.Cursor) -> list[str]:
    """Instances whose integration emits no receipts at all (EVOLUTION: only send.message)."""
    rows = cur.execute(
        "SELECT instance FROM lanes WHERE integration = ?", (EVOLUTION_CHANNEL,)
    ).fetchall()
    return [row[0] for row in rows]


def stuck_without_webhooks(
    db: Database, now: float, ack_timeout: float, limit: int
) -> list[tuple[str, str, str, str | None]]:
    """Messages accepted over `ack_timeout` ago with no receipt since, on instances no webhook
    ever came from and whose integration can report receipts: (id, instance, evolution key,
    remote jid), oldest first. What the sweep would mark unconfirmed without asking."""
    rows = db.query(
        "SELECT m.id, m.instance, m.evolution_key, m.remote_jid FROM messages m"
        " LEFT JOIN lanes l ON l.instance = m.instance"
        " WHERE m.delivery = 'accepted' AND m.finished_at <= ? AND m.sandbox = 0"
        " AND m.evolution_key IS NOT NULL AND l.last_webhook_at IS NULL"
        " AND l.integration IS NOT ? ORDER BY m.finished_at LIMIT ?",
        (clock.to_db(now - ack_timeout), EVOLUTION_CHANNEL, limit),
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


def silent_instances(db: Database) -> frozenset[str]:
    """`silent_instances_in` on a read connection."""
    rows = db.query("SELECT instance FROM lanes WHERE integration = ?", (EVOLUTION_CHANNEL,))
    return frozenset(row[0] for row in rows)


def drop_pending_in(cur: sqlite3.Cursor, before: float) -> int:
    """Forget receipts that waited since before `before` for a send that never recorded their
    key (it failed, or was not ours); returns how many."""
    cur.execute("DELETE FROM receipts_pending WHERE received_at < ?", (clock.to_db(before),))
    return cur.rowcount


def pause_in(cur: sqlite3.Cursor, instance: str, reason: str, now: float) -> bool:
    """Pause an instance as an operator would; False when it was paused already."""
    row = cur.execute("SELECT paused FROM lanes WHERE instance = ?", (instance,)).fetchone()
    if row is not None and row[0]:
        return False
    cur.execute(
        "INSERT INTO lanes (instance, paused, paused_at, paused_reason) VALUES (?, 1, ?, ?)"
        " ON CONFLICT (instance) DO UPDATE SET paused = 1, paused_at = excluded.paused_at,"
        " paused_reason = excluded.paused_reason",
        (instance, clock.to_db(now), reason),
    )
    return True


# -- reading, and the operator's writes ------------------------------------------------------


def set_secret(db: Database, sha256: str, now: float) -> None:
    """Keep the hash of a new webhook secret (the old one stops working)."""
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO webhook_secrets (name, sha256, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256,"
            " created_at = excluded.created_at",
            (SECRET_NAME, sha256, clock.to_db(now)),
        )


def secret_digest(db: Database) -> str | None:
    """The hex SHA-256 of the webhook secret; None when none was made."""
    rows = db.query("SELECT sha256 FROM webhook_secrets WHERE name = ?", (SECRET_NAME,))
    return rows[0][0] if rows else None


def last_webhooks(db: Database) -> dict[str, str]:
    """instance -> when its webhook was last heard (ledger time), for instances ever heard."""
    rows = db.query("SELECT instance, last_webhook_at FROM lanes WHERE last_webhook_at IS NOT NULL")
    return {row[0]: row[1] for row in rows}


def delivery_counts(db: Database) -> dict[str, int]:
    """Sent messages by delivery state (every state present, zero included)."""
    # One probe of the messages_delivery index per state, as Store.counts does for status.
    return {
        state.value: db.query("SELECT count(*) FROM messages WHERE delivery = ?", (state.value,))[
            0
        ][0]
        for state in Delivery
    }


# Delivery states at or past each funnel step (the ladder only moves forward, and `failed` ranks
# below `delivered`: a message delivered is never counted failed).
_DELIVERED = tuple(
    s.value for s in Delivery if DELIVERY_RANK[s] >= DELIVERY_RANK[Delivery.DELIVERED]
)
_READ = tuple(s.value for s in Delivery if DELIVERY_RANK[s] >= DELIVERY_RANK[Delivery.READ])


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"  # enum values: not user input


def delivery_funnel(db: Database, since: float, width: int) -> list[tuple[int, int, int, int, int]]:
    """Messages Evolution accepted since a time, by the hour (`width`) of their acceptance:
    (seconds after `since` // width, sent, delivered, read, failed), each step counted by the
    message's delivery state now. Sandbox messages have no delivery state and are not counted."""
    # finished_at >= ? seeks the messages_finished index; a delivery state implies SUCCESS.
    rows = db.query(
        "SELECT (CAST(strftime('%s', finished_at) AS INTEGER) - ?) / ? AS bucket, count(*),"
        f" sum(delivery IN {_in(_DELIVERED)}), sum(delivery IN {_in(_READ)}),"
        " sum(delivery = 'failed')"
        " FROM messages WHERE finished_at >= ? AND delivery IS NOT NULL GROUP BY bucket",
        (int(since), width, clock.to_db(int(since))),
    )
    return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]
