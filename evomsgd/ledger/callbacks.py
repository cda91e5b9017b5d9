"""The callback outbox in the ledger: endpoints and their secrets, what is due, outcomes, replay.

Rows are written by the triggers of migration 7, inside the transaction of the status change
that causes them; this module reads them and writes what the sender and the operators do.
The `..._in(cur, ...)` functions run inside the caller's transaction (the group committer's).
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any

from evomsgd import clock
from evomsgd.ledger.database import Database
from evomsgd.ledger.records import CallbackOutcome, CallbackRow, Due, Endpoint

DEFAULT = "default"
STATES = ("pending", "sent", "failed")
_ROW = ", ".join(f"c.{name}" for name in CallbackRow.__slots__)
_ENDPOINT = (
    "name, url, secret, previous_secret, previous_until, disabled_at, disabled_reason,"
    " last_ok_at, last_error_at, last_error, created_at"
)


def new_secret() -> str:
    """A fresh Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def token_endpoint(token: str) -> str:
    """The endpoint name of a token's callbacks."""
    return f"token:{token}"


def _row(values: Sequence[Any]) -> CallbackRow:
    return CallbackRow(*values)


def _signing(secret: str, previous: str | None, until: str | None, now_db: str) -> tuple[str, ...]:
    if previous and until and until > now_db:
        return (secret, previous)
    return (secret,)


def _endpoint(values: Sequence[Any], now_db: str) -> Endpoint:
    name, url, secret, previous, until, *rest = values
    return Endpoint(name, url, _signing(secret, previous, until, now_db), *rest)


# -- endpoints ---------------------------------------------------------------------------------


def sync_default(
    db: Database, url: str | None, secret: str | None, retrying: bool, overlap: float, now: float
) -> None:
    """Bring the default endpoint in line with the settings; a changed secret starts a rotation
    (the old one keeps signing alongside for `overlap` seconds). `retrying` applies to all."""
    now_db = clock.to_db(now)
    with db.transaction() as cur:
        cur.execute("UPDATE callback_endpoints SET retrying = ?", (int(retrying),))
        if secret is None:
            cur.execute("UPDATE callback_endpoints SET url = NULL WHERE name = ?", (DEFAULT,))
            return
        row = cur.execute(
            "SELECT secret FROM callback_endpoints WHERE name = ?", (DEFAULT,)
        ).fetchone()
        if row is None:
            cur.execute(
                "INSERT INTO callback_endpoints (name, url, secret, retrying, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (DEFAULT, url, secret, int(retrying), now_db),
            )
            return
        cur.execute("UPDATE callback_endpoints SET url = ? WHERE name = ?", (url, DEFAULT))
        if row[0] != secret:
            _rotate_in(cur, DEFAULT, secret, overlap, now)


def add_endpoint(db: Database, name: str, url: str, secret: str, now: float) -> None:
    """Create or replace an endpoint (a token's, made with the token)."""
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO callback_endpoints (name, url, secret, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET url = excluded.url, secret = excluded.secret,"
            " previous_secret = NULL, previous_until = NULL, disabled_at = NULL,"
            " disabled_reason = NULL",
            (name, url, secret, clock.to_db(now)),
        )


def remove_endpoint(db: Database, name: str) -> None:
    """Forget an endpoint (its token was revoked); callbacks still owed to it fail: no URL."""
    with db.transaction() as cur:
        cur.execute("DELETE FROM callback_endpoints WHERE name = ?", (name,))


def _rotate_in(cur: sqlite3.Cursor, name: str, secret: str, overlap: float, now: float) -> bool:
    cur.execute(
        "UPDATE callback_endpoints SET previous_secret = secret, previous_until = ?, secret = ?"
        " WHERE name = ?",
        (clock.to_db(now + overlap), secret, name),
    )
    return cur.rowcount == 1


def rotate(db: Database, name: str, secret: str, overlap: float, now: float) -> bool:
    """Sign with `secret` from now on, and with the old one too for `overlap` seconds; False
    when there is no such endpoint."""
    with db.transaction() as cur:
        return _rotate_in(cur, name, secret, overlap, now)


def enable(db: Database, name: str) -> bool:
    """Re-enable an endpoint disabled by a 410; its waiting callbacks go at once. False when
    there is no such endpoint."""
    with db.transaction() as cur:
        cur.execute(
            "UPDATE callback_endpoints SET disabled_at = NULL, disabled_reason = NULL"
            " WHERE name = ?",
            (name,),
        )
        return cur.rowcount == 1


def endpoints(db: Database, now: float) -> list[Endpoint]:
    """Every endpoint, by name."""
    now_db = clock.to_db(now)
    rows = db.query(f"SELECT {_ENDPOINT} FROM callback_endpoints ORDER BY name")
    return [_endpoint(row, now_db) for row in rows]


# -- the sender's queries ------------------------------------------------------------------------


# A pending row that is the first pending of its key, to an endpoint that is not disabled.
_HEAD = (
    "c.state = 'pending' AND e.disabled_at IS NULL AND NOT EXISTS (SELECT 1 FROM callbacks p"
    " WHERE p.key = c.key AND p.state = 'pending' AND p.id < c.id)"
)


def due(db: Database, now: float, limit: int, busy: Collection[int] = ()) -> list[Due]:
    """Pending callbacks due by `now`, oldest due first, each the first pending of its key (a
    message's later events wait for its earlier ones), leaving out disabled endpoints and `busy`
    rows (being attempted)."""
    now_db = clock.to_db(now)
    skip = list(busy)
    sql = (
        f"SELECT {_ROW}, coalesce(c.url, e.url), e.secret, e.previous_secret, e.previous_until"
        " FROM callbacks c LEFT JOIN callback_endpoints e ON e.name = c.endpoint"
        f" WHERE c.next_attempt_at <= ? AND {_HEAD}"
    )
    if skip:
        sql += f" AND c.id NOT IN ({', '.join('?' * len(skip))})"
    sql += " ORDER BY c.next_attempt_at, c.id LIMIT ?"
    width = len(CallbackRow.__slots__)
    found = []
    for values in db.query(sql, [now_db, *skip, limit]):
        row = _row(values[:width])
        url, secret, previous, until = values[width:]
        secrets = () if secret is None else _signing(secret, previous, until, now_db)
        found.append(Due(row, url, secrets))
    return found


def next_due(db: Database) -> float | None:
    """When the earliest callback that may go next is due (None when none waits)."""
    value = db.query(
        "SELECT min(c.next_attempt_at) FROM callbacks c"
        f" LEFT JOIN callback_endpoints e ON e.name = c.endpoint WHERE {_HEAD}"
    )[0][0]
    return None if value is None else clock.from_db(value)


def record_in(cur: sqlite3.Cursor, out: CallbackOutcome) -> None:
    """Write one attempt's outcome; a forwarded (or abandoned) relay body is erased with it."""
    at_db = clock.to_db(out.at)
    row = cur.execute(
        "SELECT kind, endpoint, url, retry_from FROM callbacks WHERE id = ?", (out.id,)
    ).fetchone()
    if row is None:  # purged meanwhile
        return
    kind, endpoint, own_url, retry_from = row
    if retry_from is not None and retry_from > at_db:
        # An operator asked for it again while this attempt was under way: that request stands.
        out = CallbackOutcome(
            out.id, out.at, out.body, "pending", clock.from_db(retry_from), out.status, out.error
        )
    erase = kind == "relay" and out.state != "pending"
    cur.execute(
        "UPDATE callbacks SET state = ?, attempts = attempts + 1,"
        " failures = CASE WHEN ? = 'sent' THEN 0 ELSE failures + 1 END,"
        " next_attempt_at = ?, last_attempt_at = ?, last_status = ?, last_error = ?,"
        " sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END,"
        " body = CASE WHEN ? THEN NULL ELSE coalesce(body, ?) END WHERE id = ?",
        (
            out.state,
            out.state,
            None if out.next_attempt_at is None else clock.to_db(out.next_attempt_at),
            at_db,
            out.status,
            out.error,
            out.state,
            at_db,
            int(erase),
            out.body,
            out.id,
        ),
    )
    if endpoint is None:
        return
    if out.state == "sent":
        cur.execute(
            "UPDATE callback_endpoints SET last_ok_at = ? WHERE name = ?", (at_db, endpoint)
        )
        return
    cur.execute(
        "UPDATE callback_endpoints SET last_error_at = ?, last_error = ? WHERE name = ?",
        (at_db, out.error, endpoint),
    )
    if out.disable is not None and own_url is None:
        cur.execute(
            "UPDATE callback_endpoints SET disabled_at = ?, disabled_reason = ?"
            " WHERE name = ? AND disabled_at IS NULL",
            (at_db, out.disable, endpoint),
        )


def relay_in(
    cur: sqlite3.Cursor, instance: str | None, event: str, url: str, body: bytes, now: float
) -> None:
    """Queue one Evolution webhook body, unchanged, for forwarding to `url` (in the webhook's
    own transaction)."""
    now_db = clock.to_db(now)
    cur.execute(
        "INSERT INTO callbacks (webhook_id, kind, type, key, instance, url, occurred_at,"
        " next_attempt_at, body) VALUES ('msg_' || lower(hex(randomblob(16))), 'relay', ?, ?,"
        " ?, ?, ?, ?, ?)",
        (event, f"relay:{instance or ''}", instance, url, now_db, now_db, body),
    )


def instance_event_in(
    cur: sqlite3.Cursor, instance: str, paused: bool, reason: str | None, now: float
) -> None:
    """Queue instance.paused / instance.resumed for a pause the engine decided (the instance
    disconnected, Evolution down, a rejected key) to the endpoints that may hear of `instance`,
    as the lanes triggers do for an operator's pause."""
    now_db = clock.to_db(now)
    cur.execute(
        "INSERT INTO callbacks (webhook_id, kind, type, key, instance, endpoint, occurred_at,"
        " next_attempt_at, data)"
        " SELECT 'msg_' || lower(hex(randomblob(16))), 'event', ?,"
        " 'instance:' || ? || ':' || endpoint, ?, endpoint, ?, ?, ? FROM callback_lane_targets"
        " WHERE instances IS NULL OR instr(',' || instances || ',', ',' || ? || ',') > 0",
        (
            "instance.paused" if paused else "instance.resumed",
            instance,
            instance,
            now_db,
            now_db,
            reason,
            instance,
        ),
    )


# -- operators -----------------------------------------------------------------------------------


def get(db: Database, callback_id: int) -> CallbackRow | None:
    """One callback by id."""
    rows = db.query(f"SELECT {_ROW} FROM callbacks c WHERE c.id = ?", (callback_id,))
    return _row(rows[0]) if rows else None


def listing(
    db: Database,
    *,
    state: str | None = None,
    since: float | None = None,
    message_id: str | None = None,
    endpoints: Collection[str] | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[CallbackRow]:
    """Callbacks newest first, filtered (`endpoints`: only these endpoints'); page with `before_id`."""
    where: list[str] = []
    params: list[Any] = []
    if state is not None:
        where.append("c.state = ?")
        params.append(state)
    if since is not None:
        where.append("c.occurred_at >= ?")
        params.append(clock.to_db(since))
    if message_id is not None:
        where.append("c.message_id = ?")
        params.append(message_id)
    if endpoints is not None:
        names = list(endpoints)
        where.append(f"c.endpoint IN ({', '.join('?' * len(names)) or 'NULL'})")
        params.extend(names)
    if before_id is not None:
        where.append("c.id < ?")
        params.append(before_id)
    sql = f"SELECT {_ROW} FROM callbacks c"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY c.id DESC LIMIT ?"
    params.append(limit)
    return [_row(row) for row in db.query(sql, params)]


def retry(db: Database, ids: Sequence[int], now: float) -> list[int]:
    """Send these callbacks again now (their EVOMSGD_CALLBACK_MAX_AGE counts from now); a relay
    whose body was erased cannot be. Returns the ids that were queued."""
    now_db = clock.to_db(now)
    queued = []
    with db.transaction() as cur:
        for callback_id in ids:
            cur.execute(
                "UPDATE callbacks SET state = 'pending', next_attempt_at = ?, retry_from = ?,"
                " failures = 0 WHERE id = ? AND (kind != 'relay' OR body IS NOT NULL)",
                (now_db, now_db, callback_id),
            )
            if cur.rowcount == 1:
                queued.append(callback_id)
    return queued


def counts(db: Database) -> dict[str, int]:
    """Callbacks by state (every state present, zero included)."""
    return {
        state: db.query("SELECT count(*) FROM callbacks WHERE state = ?", (state,))[0][0]
        for state in STATES
    }


def oldest_pending(db: Database) -> float | None:
    """When the oldest pending callback's event happened (None when none waits)."""
    rows = db.query("SELECT min(occurred_at) FROM callbacks WHERE state = 'pending'")
    return None if rows[0][0] is None else clock.from_db(rows[0][0])


def pending_by_endpoint(db: Database) -> dict[str, int]:
    """endpoint -> its pending callbacks (relays under '')."""
    rows = db.query(
        "SELECT coalesce(endpoint, ''), count(*) FROM callbacks WHERE state = 'pending'"
        " GROUP BY endpoint"
    )
    return {row[0]: row[1] for row in rows}
