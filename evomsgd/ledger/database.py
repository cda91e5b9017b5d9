"""The ledger file and the discipline every query runs under; the queries live in store.py.

One write connection behind a lock with BEGIN IMMEDIATE transactions (the group commit), one read
connection per thread, explicit pragmas, recorded migrations - or, for `evomsgd status` and
`doctor`, a read-only view opened with `mode=ro`. `transaction()`, `query()` and `run_script()`
are the way in for the ledger's own modules (store.py, retention.py) only: SQL stays in ledger/.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from evomsgd import clock
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.schema import MIGRATIONS

log = logging.getLogger("evomsgd.store")

LEDGER_FILE = "evomsgd.db"
# After a purge the WAL is cut back to this size at its next reset, not left at its peak.
_WAL_LIMIT = 8 * 1024 * 1024
# What a read-only view reads; a SQLite file without these tables is not an evomsgd ledger.
_VIEW_TABLES = ("schema_migrations", "messages", "events", "lanes")

Durability = Literal["full", "normal"]


class Database:
    """One write connection behind a lock, BEGIN IMMEDIATE transactions, one read connection per thread.

    `readonly=True` opens an existing ledger as a view: `mode=ro`, no migrations, no chmod, every
    write refused; it works whether the daemon runs or not.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        durability: Durability = "full",
        busy_timeout: float = 5.0,
        readonly: bool = False,
        replicated: bool = False,
    ):
        self.data_dir = data_dir
        # Litestream replicates the file: checkpoints are its job (see _connect).
        self.replicated = replicated
        self.path = data_dir / LEDGER_FILE
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        # A view reports any damage as "cannot read" (status and doctor print it and go on); the
        # daemon keeps its contract: only operational failures (locked, I/O) are an outage.
        self._read_errors: type[sqlite3.Error] = (
            sqlite3.DatabaseError if readonly else sqlite3.OperationalError
        )
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        if readonly:
            self._conn = self._open_view()
        else:
            self._conn = self._connect()
            self._migrate()
            _restrict(self.path)

    # -- connections ----------------------------------------------------------------------

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        readonly = readonly or self.readonly
        if self.readonly:
            # mode=ro: SQLite itself refuses writes, and a missing file is an error, not a new ledger.
            conn = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=ro",
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
        if not readonly:
            # Only takes effect on a new file (or at the next VACUUM): purges then give freed
            # pages back to the filesystem with `incremental_vacuum` instead of keeping them.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            if self.replicated:
                # Litestream copies the WAL before it checkpoints; a checkpoint of ours could
                # race that copy and force it into a new snapshot. Its documented advice: leave
                # checkpoints to it (it runs them every minute, or when the WAL passes 1000 pages).
                conn.execute("PRAGMA wal_autocheckpoint=0")
        # FULL fsyncs the WAL on every commit: a 202 survives power loss. NORMAL survives a
        # crash of the process but may lose the last commits on power loss. Set explicitly:
        # the compiled-in default differs between distributions (and a frozen binary's build host).
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        if readonly:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def _open_view(self) -> sqlite3.Connection:
        """A read-only connection to an existing evomsgd ledger, or StoreUnavailable saying why not."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(readonly=True)
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreUnavailable(self._unreadable(exc)) from exc
        missing = [name for name in _VIEW_TABLES if name not in tables]
        if missing:
            conn.close()
            # SQLite's own words for a query on such a file: the same whichever command asks.
            raise StoreUnavailable(self._unreadable(f"no such table: {missing[0]}"))
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _writable(self) -> None:
        if self.readonly:
            raise StoreUnavailable(
                f"the ledger {self.path} is open read-only here - change it through the daemon "
                "or a command that opens it for writing"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """A BEGIN IMMEDIATE transaction on the write connection; errors become StoreUnavailable."""
        self._writable()
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

    def run_script(self, script: str) -> None:
        """Run `script` on the write connection under the write lock, outside `transaction()`.

        For what SQLite runs only outside a transaction (VACUUM, a checkpoint) or steps to its end
        only in a script (`incremental_vacuum`). A transaction the script opened is rolled back
        on failure; the sqlite3 error propagates, for the caller to say what failed.
        """
        self._writable()
        with self._lock:
            try:
                self._conn.executescript(script)
            except BaseException:
                self._rollback()
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one read on this thread's read connection; failures are StoreUnavailable."""
        try:
            return self._reader().execute(sql, params).fetchall()
        except self._read_errors as exc:
            raise StoreUnavailable(self._unreadable(exc)) from exc

    def _unreadable(self, exc: sqlite3.Error | str) -> str:
        if self.readonly:
            return f"cannot read {self.path}: {exc}"
        return f"the ledger cannot be read: {exc} ({self.path})"

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

    def write_problem(self) -> str | None:
        """Why the ledger cannot be written right now (for /health); None when it can."""
        # An empty transaction never touches the disk: a read-only file system would pass it.
        if self.read_only_fs():
            return self._read_only()
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1")
        except StoreUnavailable as exc:
            return str(exc)
        return None if os.access(self.path, os.W_OK) else f"{self.path} is not writable"

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def file_size(self) -> int:
        """Bytes on disk: the ledger and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

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
        with self.transaction() as cur:
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
