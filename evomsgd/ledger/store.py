"""The SQLite ledger: the source of truth for every message the daemon has accepted."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from evomsgd import clock
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.records import (
    Event,
    InsertResult,
    ListFilter,
    Message,
    NewMessage,
    PurgeReport,
    Retention,
    TokenRow,
    Transition,
)
from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.models import FINAL, WAITING, Status

log = logging.getLogger("evomsgd.store")

LEDGER_FILE = "evomsgd.db"
_WAITING = tuple(s.value for s in WAITING)
_FINAL = tuple(s.value for s in FINAL)
_IN_WAITING = "status IN ('PENDING', 'SCHEDULED', 'RETRY')"
_IN_FINAL = "+status IN ('SUCCESS', 'FAILURE', 'CANCELED', 'EXPIRED')"
# After a purge the WAL is cut back to this size at its next reset, not left at its peak.
# An earlier message to the same recipient on the same instance and of the same priority that is
# still to be sent - waiting (a SCHEDULED one only once due) or being sent - holds `m` back.
# The only parameter is now. Served by the messages_recipient partial index.
_EARLIER_UNSENT = (
    "SELECT 1 FROM messages e WHERE e.instance = m.instance AND e.phone = m.phone"
    " AND e.priority = m.priority AND e.seq < m.seq"
    " AND e.status IN ('PENDING', 'RETRY', 'STARTED', 'SCHEDULED')"
    " AND (e.status != 'SCHEDULED' OR e.next_attempt_at <= ?)"
)
_WAL_LIMIT = 8 * 1024 * 1024

Durability = Literal["full", "normal"]

# The newest failure among the latest 10,000 history rows: a bounded read however big the ledger
# (a daemon that has sent 10,000 messages since its last failure reports none). Shared with
# `evomsgd status`, which runs it on a read-only connection while the daemon is down.
LAST_ERROR_SQL = (
    "SELECT at, message_id, instance, coalesce(detail, outcome, event) FROM"
    " (SELECT id, at, message_id, instance, event, outcome, detail FROM events"
    "  ORDER BY id DESC LIMIT 10000)"
    " WHERE (event = 'attempt' AND outcome NOT IN ('sent', 'sent_unconfirmed'))"
    " OR event IN ('expired', 'recovered') ORDER BY id DESC LIMIT 1"
)


def last_error_row(row: Sequence[Any] | None) -> dict[str, Any] | None:
    """LAST_ERROR_SQL's row as {at, task_id, instance, error}."""
    if row is None:
        return None
    return {
        "at": clock.db_to_rfc3339(row[0]),
        "task_id": row[1],
        "instance": row[2],
        "error": row[3],
    }


_COLUMNS = ", ".join(Message.__slots__)


def _message(row: Sequence[Any]) -> Message:
    msg = Message(*row)
    msg.status = Status(msg.status)
    msg.sandbox = bool(msg.sandbox)
    return msg


class Store:
    """One write connection behind a lock, BEGIN IMMEDIATE transactions, one read connection per thread."""

    def __init__(
        self, data_dir: Path, *, durability: Durability = "full", busy_timeout: float = 5.0
    ):
        self.data_dir = data_dir
        self.path = data_dir / LEDGER_FILE
        self.durability = durability
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._conn = self._connect()
        self._migrate()
        _restrict(self.path)

    # -- connections ----------------------------------------------------------------------

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        if not readonly:
            # Only takes effect on a new file (or at the next VACUUM): purges then give freed
            # pages back to the filesystem with `incremental_vacuum` instead of keeping them.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        # FULL fsyncs the WAL on every commit: a 202 survives power loss. NORMAL survives a
        # crash of the process but may lose the last commits on power loss. Set explicitly:
        # the compiled-in default differs between distributions (and a frozen binary's build host).
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        if readonly:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """A BEGIN IMMEDIATE transaction on the write connection; errors become StoreUnavailable."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                raise StoreUnavailable(f"the ledger cannot be written: {self._why(exc)}") from exc
            except BaseException:
                self._rollback()
                raise
            finally:
                cur.close()

    def _why(self, exc: sqlite3.Error) -> str:
        # SQLite says "disk I/O error" when the file system turned read-only under it.
        if self.read_only_fs():
            return f"{self._read_only(exc)}; accepted messages are safe on disk"
        return f"{exc} ({self.path})"

    def _read_only(self, exc: sqlite3.Error | None = None) -> str:
        cause = f" ({exc})" if exc is not None else ""
        return (
            f"data directory {self.data_dir} is on a read-only file system{cause} - "
            "remount it read-write and restart evomsgd"
        )

    def read_only_fs(self) -> bool:
        """True when the data directory's file system refuses writes (EROFS).

        A real write is the only reliable test: ext4 forced read-only by a disk error still
        reports itself read-write to statvfs and access().
        """
        probe = self.data_dir / ".write-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            return exc.errno == errno.EROFS
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return False

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the ledger cannot be read: {exc} ({self.path})") from exc

    def close(self) -> None:
        """Close every connection (readers of other threads included)."""
        with self._readers_lock:
            for conn in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._readers.clear()
        with self._lock:
            self._conn.close()

    def _migrate(self) -> None:
        with self._write() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL, description TEXT NOT NULL)"
            )
            done = {row[0] for row in cur.execute("SELECT version FROM schema_migrations")}
            for version, description, sql in MIGRATIONS:
                if version in done:
                    continue
                for statement in _statements(sql):
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (version, clock.to_db(clock.now()), description),
                )
                log.info("ledger migrated to schema version %s (%s)", version, description)

    # -- accepting ------------------------------------------------------------------------

    def insert_messages(
        self, batch: Sequence[NewMessage], *, idempotency_ttl: float = 86_400.0
    ) -> list[InsertResult]:
        """Write a batch in one transaction (group commit); one result per message, in order."""
        results: list[InsertResult] = []
        rows: list[tuple[Any, ...]] = []  # consecutive plain inserts, written with one executemany
        with self._write() as cur:
            for new in batch:
                if new.idempotency_key is not None:
                    _insert_rows(cur, rows)  # keep arrival order (seq) across the lookup
                    replay = self._idempotent(cur, new, idempotency_ttl)
                    if replay is not None:
                        results.append(replay)
                        continue
                rows.append(_row(new))
                results.append(InsertResult("created", new.id, new.status))
            _insert_rows(cur, rows)
        return results

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
        rows = self._read(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return _message(rows[0]) if rows else None

    def history(self, message_id: str) -> list[Event]:
        """Every event of one message, oldest first."""
        rows = self._read(
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
        sql = f"SELECT {_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(flt.limit)
        return [_message(row) for row in self._read(sql, params)]

    def counts(self) -> dict[str, int]:
        """Messages by status (every status present, zero included)."""
        counts = {s.value: 0 for s in Status}
        # One index probe per status instead of a full scan for GROUP BY.
        for status in Status:
            counts[status.value] = self._read(
                "SELECT count(*) FROM messages WHERE status = ?", (status.value,)
            )[0][0]
        return counts

    def oldest_waiting(self, now: float) -> float | None:
        """Seconds the oldest due waiting message has waited (None when nothing waits)."""
        rows = self._read(
            f"SELECT min(next_attempt_at) FROM messages WHERE {_IN_WAITING} AND next_attempt_at <= ?",
            (clock.to_db(now),),
        )
        oldest = rows[0][0]
        return None if oldest is None else max(0.0, now - clock.from_db(oldest))

    def last_error(self) -> dict[str, Any] | None:
        """The newest failed attempt, expiry or crash recovery: {at, task_id, instance, error}."""
        rows = self._read(LAST_ERROR_SQL)
        return last_error_row(rows[0] if rows else None)

    def waiting_by_instance(self) -> dict[str, tuple[int, str | None]]:
        """instance -> (waiting count, earliest next_attempt_at)."""
        rows = self._read(
            f"SELECT instance, count(*), min(next_attempt_at) FROM messages WHERE {_IN_WAITING} "
            "GROUP BY instance"
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    def ready(
        self, instance: str, now: float, limit: int, exclude: Iterable[str] = ()
    ) -> list[str]:
        """Ids due on one instance, best first: high priority, then the longest waiting.

        A message whose recipient has an earlier one of its priority still unsent (waiting for
        a retry, or being sent) is not ready: one recipient gets its messages in the order they
        were accepted, one at a time.
        """
        excluded = list(exclude)
        now_db = clock.to_db(now)
        sql = (
            f"SELECT id FROM messages m WHERE instance = ? AND {_IN_WAITING} AND next_attempt_at <= ?"
            f" AND NOT EXISTS ({_EARLIER_UNSENT})"
        )
        if excluded:
            sql += f" AND id NOT IN ({', '.join('?' * len(excluded))})"
        sql += " ORDER BY priority DESC, next_attempt_at, seq LIMIT ?"
        rows = self._read(sql, [instance, now_db, now_db, *excluded, limit])
        return [row[0] for row in rows]

    def next_due(self, instance: str, now: float, exclude: Iterable[str] = ()) -> float | None:
        """When the next waiting message of an instance that is not held back becomes due."""
        excluded = list(exclude)
        # Held-back messages are left out: they become ready when the message ahead of them is
        # attempted, which wakes the dispatcher anyway; counting them would wake it in a loop.
        sql = (
            f"SELECT min(next_attempt_at) FROM messages m WHERE instance = ? AND {_IN_WAITING}"
            f" AND NOT EXISTS ({_EARLIER_UNSENT})"
        )
        if excluded:
            sql += f" AND id NOT IN ({', '.join('?' * len(excluded))})"
        value = self._read(sql, [instance, clock.to_db(now), *excluded])[0][0]
        return None if value is None else clock.from_db(value)

    def known_instances(self) -> set[str]:
        """Instances that have sent at least once (outside sandbox mode)."""
        return {
            row[0]
            for row in self._read("SELECT instance FROM lanes WHERE first_sent_at IS NOT NULL")
        }

    def mark_sent_once(self, instance: str, now: float) -> None:
        """Record an instance's first send (kept; later calls change nothing)."""
        with self._write() as cur:
            cur.execute(
                "INSERT INTO lanes (instance, first_sent_at) VALUES (?, ?) ON CONFLICT (instance)"
                " DO UPDATE SET first_sent_at = coalesce(first_sent_at, excluded.first_sent_at)",
                (instance, clock.to_db(now)),
            )

    def fail_waiting(
        self, instance: str, now: float, reason: str, kind: str, exclude: Iterable[str] = ()
    ) -> list[str]:
        """End every waiting message of an instance FAILURE without a send; returns their ids."""
        excluded = list(exclude)
        now_db = clock.to_db(now)
        sql = f"SELECT id FROM messages WHERE instance = ? AND {_IN_WAITING}"
        if excluded:
            sql += f" AND id NOT IN ({', '.join('?' * len(excluded))})"
        with self._write() as cur:
            ids = [row[0] for row in cur.execute(sql + " LIMIT 1000", [instance, *excluded])]
            for message_id in ids:
                cur.execute(
                    "UPDATE messages SET status = 'FAILURE', finished_at = ?, next_attempt_at = NULL,"
                    " last_error = ?, error_kind = ? WHERE id = ?",
                    (now_db, reason, kind, message_id),
                )
                self._event(cur, message_id, instance, now_db, "failed", reason)
        return ids

    def attempt_times(self, instance: str, since: float) -> list[float]:
        """Start times of calls to Evolution on one instance since a time (for send caps)."""
        rows = self._read(
            "SELECT at FROM events WHERE event = 'attempt' AND instance = ? AND at >= ? ORDER BY at",
            (instance, clock.to_db(since)),
        )
        return [clock.from_db(row[0]) for row in rows]

    def paused_lanes(self) -> dict[str, str | None]:
        """Instances an operator paused, with the reason given."""
        return {
            row[0]: row[1]
            for row in self._read("SELECT instance, paused_reason FROM lanes WHERE paused = 1")
        }

    def write_problem(self) -> str | None:
        """Why the ledger cannot be written right now (for /health); None when it can."""
        # An empty transaction never touches the disk: a read-only file system would pass it.
        if self.read_only_fs():
            return self._read_only()
        try:
            with self._write() as cur:
                cur.execute("SELECT 1")
        except StoreUnavailable as exc:
            return str(exc)
        return None if os.access(self.path, os.W_OK) else f"{self.path} is not writable"

    # -- delivering -----------------------------------------------------------------------

    def claim(self, message_id: str, now: float, lease: float) -> Message | None:
        """Compare-and-set a waiting message to STARTED under a lease; None if someone else has it."""
        now_db = clock.to_db(now)
        with self._write() as cur:
            cur.execute(
                f"UPDATE messages SET status = 'STARTED', attempts = attempts + 1, started_at = ?,"
                f" lease_until = ?, next_attempt_at = NULL WHERE id = ? AND {_IN_WAITING}"
                " AND expires_at > ?",
                (now_db, clock.to_db(now + lease), message_id, now_db),
            )
            if cur.rowcount != 1:
                return None
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
        return _message(row)

    def finish_attempt(self, msg: Message, started: float, now: float, tr: Transition) -> bool:
        """Record an attempt's outcome and the message's new status; False if the lease was lost."""
        now_db = clock.to_db(now)
        final = tr.status.value in _FINAL
        with self._write() as cur:
            cur.execute(
                "UPDATE messages SET status = ?, next_attempt_at = ?, lease_until = NULL,"
                " finished_at = ?, retries_used = retries_used + ?, ambiguous = ambiguous + ?,"
                " last_error = coalesce(?, last_error), error_kind = coalesce(?, error_kind),"
                " evolution_key = coalesce(?, evolution_key), remote_jid = coalesce(?, remote_jid)"
                " WHERE id = ? AND status = 'STARTED' AND started_at = ?",
                (
                    tr.status.value,
                    None if final else clock.to_db(tr.next_attempt_at or now),
                    now_db if final else None,
                    int(tr.spend_retry),
                    int(tr.ambiguous),
                    # A SUCCESS keeps no error, except what Evolution said of an unconfirmed one.
                    tr.detail if tr.status is not Status.SUCCESS or tr.error_kind else None,
                    tr.error_kind,
                    tr.evolution_key,
                    tr.remote_jid,
                    msg.id,
                    msg.started_at,
                ),
            )
            if cur.rowcount != 1:
                return False
            cur.execute(
                "INSERT INTO events (message_id, at, instance, event, attempt, outcome, http_status,"
                " detail) VALUES (?, ?, ?, 'attempt', ?, ?, ?, ?)",
                (
                    msg.id,
                    clock.to_db(started),
                    msg.instance,
                    msg.attempts,
                    tr.outcome,
                    tr.http_status,
                    tr.detail,
                ),
            )
            for event, detail in tr.extra_events:
                self._event(cur, msg.id, msg.instance, now_db, event, detail)
        return True

    @staticmethod
    def _event(
        cur: sqlite3.Cursor, message_id: str, instance: str, at: str, event: str, detail: str | None
    ) -> None:
        cur.execute(
            "INSERT INTO events (message_id, at, instance, event, detail) VALUES (?, ?, ?, ?, ?)",
            (message_id, at, instance, event, detail),
        )

    def recover(self, now: float, *, only_expired_leases: bool) -> list[tuple[str, str]]:
        """Put STARTED messages back to RETRY: all of them at start-up, or those whose lease ran out.

        Such a message may have reached Evolution before the crash, so it is counted as ambiguous
        and recovered; the next send may duplicate it, and the ledger says so.
        """
        now_db = clock.to_db(now)
        sql = "SELECT id, instance FROM messages WHERE status = 'STARTED'"
        params: tuple[Any, ...] = ()
        if only_expired_leases:
            sql += " AND lease_until < ?"
            params = (now_db,)
        with self._write() as cur:
            rows = cur.execute(sql, params).fetchall()
            detail = (
                "lease expired while sending; it may have been delivered"
                if only_expired_leases
                else "daemon stopped while sending; it may have been delivered"
            )
            for message_id, instance in rows:
                cur.execute(
                    "UPDATE messages SET status = 'RETRY', lease_until = NULL, next_attempt_at = ?,"
                    " recovered = recovered + 1, ambiguous = ambiguous + 1, last_error = ?,"
                    " error_kind = 'ambiguous' WHERE id = ?",
                    (now_db, detail, message_id),
                )
                self._event(cur, message_id, instance, now_db, "recovered", detail)
        return [(row[0], row[1]) for row in rows]

    def expire_due(self, now: float) -> list[tuple[str, str]]:
        """Mark waiting messages past their expiry EXPIRED; returns (id, instance) pairs."""
        now_db = clock.to_db(now)
        with self._write() as cur:
            rows = cur.execute(
                f"SELECT id, instance FROM messages WHERE {_IN_WAITING} AND expires_at <= ? LIMIT 1000",
                (now_db,),
            ).fetchall()
            for message_id, instance in rows:
                cur.execute(
                    "UPDATE messages SET status = 'EXPIRED', finished_at = ?, next_attempt_at = NULL,"
                    " error_kind = 'expired', last_error = coalesce(last_error || ' - ', '') ||"
                    " 'not sent before it expired at ' || expires_at WHERE id = ?",
                    (now_db, message_id),
                )
                self._event(
                    cur, message_id, instance, now_db, "expired", "not sent before its expiry"
                )
        return [(row[0], row[1]) for row in rows]

    # -- operators ------------------------------------------------------------------------

    def cancel(self, message_id: str, now: float) -> tuple[bool, Message | None]:
        """Cancel a message that has not been sent; (whether this call canceled it, the row now)."""
        now_db = clock.to_db(now)
        with self._write() as cur:
            cur.execute(
                f"UPDATE messages SET status = 'CANCELED', finished_at = ?, next_attempt_at = NULL,"
                f" error_kind = 'canceled' WHERE id = ? AND {_IN_WAITING}",
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
        """Send a FAILURE/EXPIRED/CANCELED message again, keeping its history; (changed, row now)."""
        now_db = clock.to_db(now)
        with self._write() as cur:
            cur.execute(
                "UPDATE messages SET status = 'PENDING', finished_at = NULL, next_attempt_at = ?,"
                " retries_used = 0, expires_at = max(expires_at, ?)"
                " WHERE id = ? AND status IN ('FAILURE', 'EXPIRED', 'CANCELED') AND text IS NOT NULL",
                (now_db, clock.to_db(expires_at), message_id),
            )
            changed = cur.rowcount == 1
            if changed:
                instance = cur.execute(
                    "SELECT instance FROM messages WHERE id = ?", (message_id,)
                ).fetchone()[0]
                self._event(
                    cur, message_id, instance, now_db, "requeued", "retry requested by an operator"
                )
        return changed, self.get(message_id)

    def set_paused(self, instance: str, paused: bool, reason: str | None, now: float) -> None:
        """Record an operator's pause or resume of one instance (survives restarts)."""
        with self._write() as cur:
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

    # -- retention ------------------------------------------------------------------------

    def purge(
        self,
        now: float,
        policy: Retention,
        *,
        dry_run: bool = False,
        batch: int = 1000,
        stop: Callable[[], bool] = lambda: False,
    ) -> PurgeReport:
        """Delete finished messages past retention (with their events), erase old texts, drop
        expired idempotency keys; `batch` rows per short transaction so other writers never wait
        long. `stop` is asked between batches (the daemon is shutting down)."""
        started = time.monotonic()
        report = PurgeReport(dry_run=dry_run, bytes_before=self.file_size())
        day = 86_400.0
        classes = [
            # `+status`: walk the finished_at index (old rows only), not every row of a status.
            ("success", "+status = 'SUCCESS'", policy.success_days),
            ("failed", "+status IN ('FAILURE', 'EXPIRED', 'CANCELED')", policy.failed_days),
        ]
        deleting: list[tuple[str, str]] = []  # (condition, cutoff) of each class purged
        for name, status_sql, days in classes:
            if days <= 0:
                continue
            where = f"finished_at IS NOT NULL AND finished_at < ? AND {status_sql}"
            cutoff = clock.to_db(now - days * day)
            deleting.append((where, cutoff))
            if dry_run:
                count, events = self._read(
                    f"SELECT count(*), (SELECT count(*) FROM events WHERE message_id IN"
                    f" (SELECT id FROM messages WHERE {where})) FROM messages WHERE {where}",
                    (cutoff, cutoff),
                )[0]
            else:
                count, events = self._delete_finished(where, cutoff, batch, stop)
            setattr(report, name, count)
            report.events += events
        if policy.erase_text_days is not None:
            where = (
                f"finished_at IS NOT NULL AND finished_at < ? AND text IS NOT NULL AND {_IN_FINAL}"
            )
            cutoff = clock.to_db(now - policy.erase_text_days * day)
            # A dry run counts only the texts of rows the deletions above would leave.
            spared = "".join(f" AND NOT ({cond})" for cond, _ in deleting)
            report.texts_erased = self._batched(
                f"UPDATE messages SET text = NULL WHERE seq IN"
                f" (SELECT seq FROM messages WHERE {where} LIMIT ?)",
                f"SELECT count(*) FROM messages WHERE {where}{spared}",
                (cutoff,),
                dry_run,
                batch,
                stop,
                count_params=(cutoff, *(c for _, c in deleting)),
            )
        report.idempotency = self._batched(
            "DELETE FROM idempotency WHERE rowid IN"
            " (SELECT rowid FROM idempotency WHERE expires_at <= ? LIMIT ?)",
            "SELECT count(*) FROM idempotency WHERE expires_at <= ?",
            (clock.to_db(now),),
            dry_run,
            batch,
            stop,
        )
        if not dry_run and report.success + report.failed + report.idempotency:
            report.vacuum = self.reclaim(stop=stop)
        report.bytes_after = self.file_size()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def _delete_finished(
        self, where: str, cutoff: str, batch: int, stop: Callable[[], bool]
    ) -> tuple[int, int]:
        messages = events = 0
        while not stop():
            held = time.monotonic()
            with self._write() as cur:
                ids = [
                    (row[0],)
                    for row in cur.execute(
                        f"SELECT id FROM messages WHERE {where} LIMIT ?", (cutoff, batch)
                    )
                ]
                cur.executemany("DELETE FROM events WHERE message_id = ?", ids)
                events += max(cur.rowcount, 0)
                cur.executemany("DELETE FROM messages WHERE id = ?", ids)
                messages += max(cur.rowcount, 0)
            if len(ids) < batch:
                break
            _step_aside(held)
        return messages, events

    def _batched(
        self,
        change: str,
        count: str,
        params: tuple[Any, ...],
        dry_run: bool,
        batch: int,
        stop: Callable[[], bool],
        count_params: tuple[Any, ...] | None = None,
    ) -> int:
        """Run `change` (ending in `LIMIT ?`) until it changes fewer than `batch` rows."""
        if dry_run:
            return int(self._read(count, params if count_params is None else count_params)[0][0])
        total = 0
        while not stop():
            held = time.monotonic()
            with self._write() as cur:
                cur.execute(change, (*params, batch))
                changed = max(cur.rowcount, 0)
            total += changed
            if changed < batch:
                break
            _step_aside(held)
        return total

    def reclaim(
        self, *, full: bool = False, pages: int = 2048, stop: Callable[[], bool] = lambda: False
    ) -> str:
        """Give free pages back to the filesystem: `incremental_vacuum` in short steps when the
        file allows it, or (full) a VACUUM that rewrites the file, blocking writers meanwhile,
        and turns incremental auto-vacuum on for later purges. Returns what was done."""
        if full:
            with self._lock:
                try:
                    self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    self._conn.execute("VACUUM")
                except sqlite3.OperationalError as exc:
                    raise StoreUnavailable(f"VACUUM failed: {exc} ({self.path})") from exc
            done = "full"
        elif self._read("PRAGMA auto_vacuum")[0][0] == 2:
            while not stop() and self._read("PRAGMA freelist_count")[0][0] > 0:
                held = time.monotonic()
                # executescript steps the pragma to its end: execute() frees a single page.
                with self._lock:
                    try:
                        self._conn.executescript(
                            f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({int(pages)}); COMMIT;"
                        )
                    except sqlite3.OperationalError as exc:
                        self._rollback()
                        raise StoreUnavailable(
                            f"the ledger cannot be written: {exc} ({self.path})"
                        ) from exc
                _step_aside(held)
            done = "incremental"
        else:
            return "none"
        # In WAL mode the file shrinks when a checkpoint copies the last commit back; PASSIVE
        # never waits for readers or blocks writers (if it cannot finish, a later one will).
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return done

    def file_size(self) -> int:
        """Bytes on disk: the ledger and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    # -- metrics and dashboard ------------------------------------------------------------

    def waiting_breakdown(self) -> list[tuple[str, str, int, float | None]]:
        """(instance, status, count, earliest next attempt) of the waiting messages only."""
        rows = self._read(
            "SELECT instance, status, count(*), min(next_attempt_at) FROM messages"
            f" WHERE {_IN_WAITING} GROUP BY instance, status"
        )
        return [
            (row[0], row[1], row[2], None if row[3] is None else clock.from_db(row[3]))
            for row in rows
        ]

    def last_event_id(self) -> int:
        """The newest event's id, 0 when there is none."""
        return int(self._read("SELECT coalesce(max(id), 0) FROM events")[0][0])

    def count_events(self, event: str, after_id: int, upto_id: int) -> dict[str, int]:
        """instance -> `event` rows with after_id < id <= upto_id (a rowid range, no scan)."""
        rows = self._read(
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
        rows = self._read(
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
        with self._write() as cur:
            cur.execute(
                "INSERT INTO tokens (name, sha256, instances, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (name, sha256, ",".join(instances) or None, clock.to_db(now)),
            )
            return cur.rowcount == 1

    def tokens(self) -> list[TokenRow]:
        """Every token, by name."""
        rows = self._read("SELECT name, sha256, instances, created_at FROM tokens ORDER BY name")
        return [
            TokenRow(name, digest, tuple(instances.split(",")) if instances else (), created)
            for name, digest, instances, created in rows
        ]

    def revoke_token(self, name: str) -> bool:
        """Delete a token; False when there is none by that name."""
        with self._write() as cur:
            cur.execute("DELETE FROM tokens WHERE name = ?", (name,))
            return cur.rowcount == 1


def _step_aside(held_since: float) -> None:
    """Pause between two purge batches as long as the last one held the write lock (at most
    50 ms): neither SQLite's busy handler nor a thread lock is fair, and back-to-back batches
    would starve the daemon's writers; this way a purge takes at most half the write time."""
    time.sleep(min(time.monotonic() - held_since, 0.05))


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (a ';' inside a comment or string does not end one)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending[:80]!r}")


def _restrict(path: Path) -> None:
    """The ledger holds message texts: readable by its owner only."""
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(candidate, 0o600)


_INSERT = (
    "INSERT INTO messages (id, status, instance, phone, phone_input, text, priority, created_at,"
    " send_at, next_attempt_at, expires_at, sandbox, idempotency_key, token_name)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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
    )


def _insert_rows(cur: sqlite3.Cursor, rows: list[tuple[Any, ...]]) -> None:
    """Write and forget the pending plain rows (one executemany: less Python per message)."""
    if rows:
        cur.executemany(_INSERT, rows)
        rows.clear()
