"""The SQLite ledger: the source of truth for every message the daemon has accepted.

Small named queries, one per question the daemon or an operator asks; how they run (the write
lock, transactions, the read-only view) is database.py's, the delivery engine's (what is due,
claims, outcomes, recovery) are deliveries.py's, retention's deletes are retention.py's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Literal

from evomsgd import clock
from evomsgd.ledger.database import LEDGER_FILE as LEDGER_FILE  # where callers of Store look
from evomsgd.ledger.deliveries import (
    COLUMNS,
    FAILED,
    IN_WAITING,
    Deliveries,
    message_from_row,
    status_in,
)
from evomsgd.ledger.records import (
    Event,
    InsertResult,
    ListFilter,
    MediaRef,
    Message,
    NewMessage,
    TokenRow,
)
from evomsgd.models import WAITING, Status

# The two integrity checks SQLite offers: quick_check skips the slow index-content comparison.
IntegrityCheck = Literal["quick_check", "integrity_check"]


# Not final yet: waiting, or in flight to Evolution.
_IN_UNSENT = f"status IN {status_in((*WAITING, Status.STARTED))}"

# The newest failure among the latest 10,000 history rows: a bounded read however big the ledger
# (a daemon that has sent 10,000 messages since its last failure reports none).
_LAST_ERROR = (
    "SELECT at, message_id, instance, coalesce(detail, outcome, event) FROM"
    " (SELECT id, at, message_id, instance, event, outcome, detail FROM events"
    "  ORDER BY id DESC LIMIT 10000)"
    " WHERE (event = 'attempt' AND outcome NOT IN ('sent', 'sent_unconfirmed'))"
    " OR event IN ('expired', 'recovered') ORDER BY id DESC LIMIT 1"
)


class Store(Deliveries):
    """The ledger's queries; open it with `Store(data_dir)`, or `readonly=True` for a view."""

    # -- accepting ------------------------------------------------------------------------

    def insert_messages(
        self, batch: Sequence[NewMessage], *, idempotency_ttl: float = 86_400.0
    ) -> list[InsertResult]:
        """Write a batch in one transaction (group commit); one result per message, in order."""
        with self.transaction() as cur:
            return self.insert_in(cur, batch, idempotency_ttl)

    def insert_in(
        self, cur: sqlite3.Cursor, batch: Sequence[NewMessage], idempotency_ttl: float
    ) -> list[InsertResult]:
        """`insert_messages` inside the caller's transaction."""
        results: list[InsertResult] = []
        rows: list[tuple[Any, ...]] = []  # consecutive plain inserts, written with one executemany
        for new in batch:
            if new.idempotency_key is not None:
                _insert_rows(cur, rows)  # keep arrival order (seq) across the lookup
                replay = self._idempotent(cur, new, idempotency_ttl)
                if replay is not None:
                    results.append(replay)
                    continue
            if new.media is not None:  # its own statement: the media columns (migration 8)
                _insert_rows(cur, rows)
                cur.execute(_INSERT_MEDIA, (*_row(new), *_media_row(new.media)))
            else:
                rows.append(_row(new))
            results.append(InsertResult("created", new.id, new.status))
        _insert_rows(cur, rows)
        return results

    def write_batch(self, ops: Sequence[Callable[[sqlite3.Cursor], Any]]) -> list[Any]:
        """Run several writes in one transaction, one fsync (the group committer's path)."""
        with self.transaction() as cur:
            return [op(cur) for op in ops]

    def _idempotent(self, cur: sqlite3.Cursor, new: NewMessage, ttl: float) -> InsertResult | None:
        key = new.idempotency_key
        now_db = clock.to_db(new.created_at)
        row = cur.execute(
            "SELECT i.request_hash, i.message_id, m.status FROM idempotency i "
            "JOIN messages m ON m.id = i.message_id WHERE i.key = ? AND i.expires_at > ?",
            (key, now_db),
        ).fetchone()
        if row is not None:
            outcome: Literal["replayed", "conflict"] = (
                "replayed" if row[0] == new.request_hash else "conflict"
            )
            return InsertResult(outcome, row[1], Status(row[2]))
        cur.execute(
            "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
            (key, new.request_hash, new.id, now_db, clock.to_db(new.created_at + ttl)),
        )
        return None

    # -- reading --------------------------------------------------------------------------

    def get(self, message_id: str) -> Message | None:
        """One message by task id."""
        rows = self.query(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return message_from_row(rows[0]) if rows else None

    def history(self, message_id: str) -> list[Event]:
        """Every event of one message, oldest first."""
        rows = self.query(
            "SELECT at, event, attempt, outcome, http_status, detail FROM events "
            "WHERE message_id = ? ORDER BY id",
            (message_id,),
        )
        return [Event(*row) for row in rows]

    def list_messages(self, flt: ListFilter) -> list[Message]:
        """Newest first, filtered; page with `before_seq`."""
        where: list[str] = []
        params: list[Any] = []
        if flt.statuses:
            where.append(f"status IN ({', '.join('?' * len(flt.statuses))})")
            params.extend(s.value for s in flt.statuses)
        if flt.deliveries:
            where.append(f"delivery IN ({', '.join('?' * len(flt.deliveries))})")
            params.extend(flt.deliveries)
        if flt.instances:
            where.append(f"instance IN ({', '.join('?' * len(flt.instances))})")
            params.extend(flt.instances)
        for column, value in (("instance", flt.instance), ("phone", flt.phone)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if flt.since is not None:
            where.append("created_at >= ?")
            params.append(clock.to_db(flt.since))
        if flt.until is not None:
            where.append("created_at < ?")
            params.append(clock.to_db(flt.until))
        if flt.before_seq is not None:
            where.append("seq < ?")
            params.append(flt.before_seq)
        sql = f"SELECT {COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(flt.limit)
        return [message_from_row(row) for row in self.query(sql, params)]

    def counts(self) -> dict[str, int]:
        """Messages by status (every status present, zero included)."""
        counts = {s.value: 0 for s in Status}
        # One index probe per status instead of a full scan for GROUP BY.
        for status in Status:
            counts[status.value] = self.query(
                "SELECT count(*) FROM messages WHERE status = ?", (status.value,)
            )[0][0]
        return counts

    def oldest_waiting(self, now: float) -> float | None:
        """Seconds the oldest due waiting message has waited (None when nothing waits)."""
        rows = self.query(
            f"SELECT min(next_attempt_at) FROM messages WHERE {IN_WAITING} AND next_attempt_at <= ?",
            (clock.to_db(now),),
        )
        oldest = rows[0][0]
        return None if oldest is None else max(0.0, now - clock.from_db(oldest))

    def last_error(self) -> dict[str, Any] | None:
        """The newest failed attempt, expiry or crash recovery: {at, task_id, instance, error}."""
        rows = self.query(_LAST_ERROR)
        if not rows:
            return None
        at, task_id, instance, error = rows[0]
        return {
            "at": clock.db_to_rfc3339(at),
            "task_id": task_id,
            "instance": instance,
            "error": error,
        }

    def paused_lanes(self) -> dict[str, str | None]:
        """Instances an operator paused, with the reason given."""
        return {
            row[0]: row[1]
            for row in self.query("SELECT instance, paused_reason FROM lanes WHERE paused = 1")
        }

    # -- what `evomsgd status` and `doctor` read, on a view ---------------------------------

    def unsent_by_instance(self) -> list[tuple[str, int, str | None]]:
        """(instance, messages not final yet, its newest last_error) for every instance, by name."""
        rows = self.query(
            f"SELECT instance, sum({_IN_UNSENT}), (SELECT last_error FROM messages newest"
            "  WHERE newest.instance = messages.instance AND newest.last_error IS NOT NULL"
            "  ORDER BY newest.seq DESC LIMIT 1)"
            " FROM messages GROUP BY instance ORDER BY instance"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def newest_is_sandbox(self) -> bool:
        """True when the newest message was recorded in sandbox mode (False on an empty ledger)."""
        rows = self.query("SELECT sandbox FROM messages ORDER BY seq DESC LIMIT 1")
        return bool(rows and rows[0][0])

    def integrity_problems(self, check: IntegrityCheck) -> list[str]:
        """What SQLite's `check` pragma finds in the file, at most 5 problems; [] when it is sound."""
        problems = [row[0] for row in self.query(f"PRAGMA {check}(5)")]
        return [] if problems == ["ok"] else problems

    def schema_version(self) -> int | None:
        """The newest migration recorded in the file (None before the first)."""
        version = self.query("SELECT max(version) FROM schema_migrations")[0][0]
        return None if version is None else int(version)

    def message_count(self) -> int:
        """Messages in the ledger, of every status."""
        return int(self.query("SELECT count(*) FROM messages")[0][0])

    def known_instances(self) -> list[str]:
        """Every instance a message or an operator's pause named."""
        rows = self.query("SELECT DISTINCT instance FROM messages UNION SELECT instance FROM lanes")
        return [row[0] for row in rows]

    # -- operators ------------------------------------------------------------------------

    def cancel(self, message_id: str, now: float) -> tuple[bool, Message | None]:
        """Cancel a message that has not been sent; (whether this call canceled it, the row now)."""
        now_db = clock.to_db(now)
        with self.transaction() as cur:
            cur.execute(
                f"UPDATE messages SET status = 'CANCELED', finished_at = ?, next_attempt_at = NULL,"
                f" error_kind = 'canceled' WHERE id = ? AND {IN_WAITING}",
                (now_db, message_id),
            )
            changed = cur.rowcount == 1
            if changed:
                instance = cur.execute(
                    "SELECT instance FROM messages WHERE id = ?", (message_id,)
                ).fetchone()[0]
                self._event(cur, message_id, instance, now_db, "canceled", "canceled by request")
        return changed, self.get(message_id)

    def requeue(
        self, message_id: str, now: float, expires_at: float
    ) -> tuple[bool, Message | None]:
        """Send a FAILURE/EXPIRED/CANCELED message again, keeping its history; (changed, row now).

        An operator's retry is an explicit "ask again": the recipient's not-on-WhatsApp memory
        for the instance is forgotten with it."""
        now_db = clock.to_db(now)
        with self.transaction() as cur:
            cur.execute(
                "UPDATE messages SET status = 'PENDING', finished_at = NULL, next_attempt_at = ?,"
                " retries_used = 0, expires_at = max(expires_at, ?)"
                f" WHERE id = ? AND status IN {status_in(FAILED)} AND text IS NOT NULL",
                (now_db, clock.to_db(expires_at), message_id),
            )
            changed = cur.rowcount == 1
            if changed:
                instance, phone = cur.execute(
                    "SELECT instance, phone FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                cur.execute(
                    "DELETE FROM contacts WHERE instance = ? AND phone = ?", (instance, phone)
                )
                self._event(
                    cur, message_id, instance, now_db, "requeued", "retry requested by an operator"
                )
        return changed, self.get(message_id)

    def forget_contact(self, phone: str, instance: str | None = None) -> list[str]:
        """Forget that `phone` is not on WhatsApp (for one instance, or all); the instances it
        was remembered for."""
        where, params = "phone = ?", [phone]
        if instance is not None:
            where, params = "phone = ? AND instance = ?", [phone, instance]
        with self.transaction() as cur:  # no RETURNING: SQLite before 3.35 (RHEL 9) lacks it
            rows = cur.execute(f"SELECT instance FROM contacts WHERE {where}", params).fetchall()
            cur.execute(f"DELETE FROM contacts WHERE {where}", params)
        return sorted(row[0] for row in rows)

    def set_paused(self, instance: str, paused: bool, reason: str | None, now: float) -> None:
        """Record an operator's pause or resume of one instance (survives restarts)."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO lanes (instance, paused, paused_at, paused_reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (instance) DO UPDATE SET paused = excluded.paused,"
                " paused_at = excluded.paused_at, paused_reason = excluded.paused_reason",
                (
                    instance,
                    int(paused),
                    clock.to_db(now) if paused else None,
                    reason if paused else None,
                ),
            )

    # -- metrics and dashboard ------------------------------------------------------------

    def waiting_breakdown(self) -> list[tuple[str, str, int, float | None]]:
        """(instance, status, count, earliest next attempt) of the waiting messages only."""
        rows = self.query(
            "SELECT instance, status, count(*), min(next_attempt_at) FROM messages"
            f" WHERE {IN_WAITING} GROUP BY instance, status"
        )
        return [
            (row[0], row[1], row[2], None if row[3] is None else clock.from_db(row[3]))
            for row in rows
        ]

    def last_event_id(self) -> int:
        """The newest event's id, 0 when there is none."""
        return int(self.query("SELECT coalesce(max(id), 0) FROM events")[0][0])

    def count_events(self, event: str, after_id: int, upto_id: int) -> dict[str, int]:
        """instance -> `event` rows with after_id < id <= upto_id (a rowid range, no scan)."""
        rows = self.query(
            "SELECT instance, count(*) FROM events WHERE id > ? AND id <= ? AND event = ?"
            " GROUP BY instance",
            (after_id, upto_id, event),
        )
        return {row[0]: row[1] for row in rows}

    def attempt_counts(self, since: float, width: int) -> list[tuple[int, str, int]]:
        """Calls to Evolution since a time: (seconds after `since` // width, outcome, count)."""
        # events_attempts is (instance, at): a range on `at` needs the instance first. The recursive
        # part walks the distinct instances by index seeks (a loose index scan), so the cost follows
        # the attempts in the window, not every attempt ever recorded.
        rows = self.query(
            "WITH RECURSIVE lanes(instance) AS ("
            " SELECT (SELECT min(instance) FROM events WHERE event = 'attempt')"
            " UNION ALL"
            " SELECT (SELECT min(instance) FROM events"
            "  WHERE event = 'attempt' AND instance > lanes.instance)"
            " FROM lanes WHERE lanes.instance IS NOT NULL)"
            " SELECT (CAST(strftime('%s', e.at) AS INTEGER) - ?) / ? AS bucket, e.outcome, count(*)"
            " FROM lanes JOIN events e"
            "  ON e.event = 'attempt' AND e.instance = lanes.instance AND e.at >= ?"
            " GROUP BY bucket, e.outcome",
            (int(since), width, clock.to_db(int(since))),
        )
        return [(row[0], row[1] or "", row[2]) for row in rows]

    # -- tokens -----------------------------------------------------------------------------

    def add_token(self, name: str, sha256: str, instances: Sequence[str], now: float) -> bool:
        """Record a token's hash; False when the name is taken."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO tokens (name, sha256, instances, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (name, sha256, ",".join(instances) or None, clock.to_db(now)),
            )
            return cur.rowcount == 1

    def tokens(self) -> list[TokenRow]:
        """Every token, by name."""
        rows = self.query(
            "SELECT t.name, t.sha256, t.instances, t.created_at, e.name IS NOT NULL FROM tokens t"
            " LEFT JOIN callback_endpoints e ON e.name = 'token:' || t.name ORDER BY t.name"
        )
        return [
            TokenRow(
                name, digest, tuple(instances.split(",")) if instances else (), created, bool(cb)
            )
            for name, digest, instances, created, cb in rows
        ]

    def revoke_token(self, name: str) -> bool:
        """Delete a token; False when there is none by that name."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM tokens WHERE name = ?", (name,))
            return cur.rowcount == 1


_INSERT = (
    "INSERT INTO messages (id, status, instance, phone, phone_input, text, priority, created_at,"
    " send_at, next_attempt_at, expires_at, sandbox, idempotency_key, token_name, callback_to,"
    " callback_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


# A message with media: the plain insert's columns, then migration 8's.
_COLUMNS_END = _INSERT.index(") VALUES")
_INSERT_MEDIA = (
    _INSERT[:_COLUMNS_END]
    + ", media_type, media_sha256, media_size, media_mimetype, media_filename, media_url"
    + _INSERT[_COLUMNS_END:].removesuffix(")")
    + ", ?, ?, ?, ?, ?, ?)"
)


def _media_row(media: MediaRef) -> tuple[Any, ...]:
    return (media.kind, media.sha256, media.size, media.mimetype, media.filename, media.url)


def _row(new: NewMessage) -> tuple[Any, ...]:
    return (
        new.id,
        new.status.value,
        new.instance,
        new.phone,
        new.phone_input,
        new.text,
        new.priority,
        clock.to_db(new.created_at),
        clock.to_db(new.send_at) if new.send_at else None,
        clock.to_db(max(new.send_at or new.created_at, new.created_at)),
        clock.to_db(new.expires_at),
        int(new.sandbox),
        new.idempotency_key,
        new.token_name,
        new.callback_to,
        new.callback_url,
    )


def _insert_rows(cur: sqlite3.Cursor, rows: list[tuple[Any, ...]]) -> None:
    """Write and forget the pending plain rows (one executemany: less Python per message)."""
    if rows:
        cur.executemany(_INSERT, rows)
        rows.clear()
