"""Retention on real SQLite files: what goes, in short batches, and the file stays bounded."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from evomsgd import clock
from evomsgd.ledger import retention
from evomsgd.ledger.media import MediaFiles
from evomsgd.ledger.records import Retention
from evomsgd.ledger.store import LEDGER_FILE, Store
from tests.conftest import daemon_env, free_port, wait_until
from tests.test_cli import run
from tests.test_e2e import Daemon, request

DAY = 86_400.0
FINAL = {"SUCCESS", "FAILURE", "CANCELED", "EXPIRED"}


def seed(
    path: Path, n: int, status: str, days_ago: float, *, events: int = 2, text: str = "x" * 200
) -> list[str]:
    """Write `n` messages finished (or created, if waiting) `days_ago`, each with `events` rows."""
    now = clock.now()
    at = clock.to_db(now - days_ago * DAY)
    final = status in FINAL
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        conn.executemany(
            "INSERT INTO messages (id, status, instance, phone, phone_input, text, created_at,"
            " next_attempt_at, expires_at, finished_at, attempts)"
            " VALUES (?, ?, 'shop', '5511988887777', '+5511988887777', ?, ?, ?, ?, ?, 1)",
            [
                (
                    i,
                    status,
                    text,
                    at,
                    None if final else at,
                    clock.to_db(now + DAY),
                    at if final else None,
                )
                for i in ids
            ],
        )
        conn.executemany(
            "INSERT INTO events (message_id, at, instance, event, attempt, outcome)"
            " VALUES (?, ?, 'shop', 'attempt', 1, 'sent')",
            [(i, at) for i in ids for _ in range(events)],
        )
    return ids


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def add_idempotency(path: Path, key: str, expires_in: float) -> None:
    now = clock.now()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO idempotency VALUES (?, 'h', 'm', ?, ?)",
            (key, clock.to_db(now), clock.to_db(now + expires_in)),
        )


def test_purge_removes_what_retention_says_and_nothing_else(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.path
    old_sent = seed(path, 23, "SUCCESS", 31)
    young_sent = seed(path, 5, "SUCCESS", 29)
    old_failed = seed(path, 4, "FAILURE", 91) + seed(path, 3, "CANCELED", 100)
    young_failed = seed(path, 6, "EXPIRED", 60)
    waiting = seed(path, 2, "PENDING", 400)  # never final: never purged, text kept
    add_idempotency(path, ":old", -1)
    add_idempotency(path, ":live", 3600)
    rules = Retention(success_days=30, failed_days=90, erase_text_days=7)
    before = rows(path, "SELECT count(*) FROM messages")

    dry = retention.purge(store, clock.now(), rules, dry_run=True, batch=7)
    assert (dry.success, dry.failed, dry.events, dry.texts_erased, dry.idempotency) == (
        23,
        7,
        60,
        11,
        1,
    )
    assert rows(path, "SELECT count(*) FROM messages") == before  # a dry run changes nothing

    done = retention.purge(store, clock.now(), rules, batch=7)
    assert (done.success, done.failed, done.events, done.texts_erased, done.idempotency) == (
        23,
        7,
        60,
        11,
        1,
    )
    kept = {row[0]: row[1] for row in rows(path, "SELECT id, text FROM messages")}
    assert set(kept) == set(young_sent + young_failed + waiting)
    assert {i for i, text in kept.items() if text is None} == set(young_sent + young_failed)
    gone = "', '".join(old_sent + old_failed)
    assert rows(path, f"SELECT count(*) FROM events WHERE message_id IN ('{gone}')") == [(0,)]
    assert rows(path, "SELECT count(*) FROM events") == [(2 * len(kept),)]
    assert rows(path, "SELECT key FROM idempotency") == [(":live",)]
    # Nothing left to do: a second run changes nothing.
    assert retention.purge(store, clock.now(), rules).removed == 0
    store.close()


def test_zero_days_keeps_messages_forever(tmp_path: Path) -> None:
    store = Store(tmp_path)
    seed(store.path, 3, "SUCCESS", 3650)
    seed(store.path, 3, "FAILURE", 3650)
    report = retention.purge(store, clock.now(), Retention(success_days=0, failed_days=0))
    assert report.removed == 0
    assert rows(store.path, "SELECT count(*) FROM messages") == [(6,)]
    store.close()


def test_purge_never_holds_the_write_lock_between_batches(tmp_path: Path) -> None:
    # Checked by structure, not by a stopwatch: the purge works in transactions of at most
    # `batch` messages, and after each one another connection gets the write lock at once
    # (busy timeout 0: it would raise "database is locked" if the purge still held it).
    store = Store(tmp_path)
    seed(store.path, 30_000, "SUCCESS", 40)
    writer = sqlite3.connect(store.path, timeout=0, isolation_level=None)
    deleted_per_transaction: list[int] = []
    transaction = store.transaction

    @contextlib.contextmanager
    def watched() -> Iterator[sqlite3.Cursor]:
        with transaction() as cur:
            before = cur.execute("SELECT count(*) FROM messages").fetchone()[0]
            yield cur
            after = cur.execute("SELECT count(*) FROM messages").fetchone()[0]
            deleted_per_transaction.append(before - after)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO lanes (instance) VALUES (?)", (str(uuid.uuid4()),))
        writer.execute("COMMIT")

    store.transaction = watched  # type: ignore[method-assign]
    report = retention.purge(store, clock.now(), Retention(30, 90), batch=1000)
    writer.close()
    assert report.success == 30_000
    assert sum(deleted_per_transaction) == 30_000
    assert max(deleted_per_transaction) <= 1000
    assert len([n for n in deleted_per_transaction if n]) == 30
    store.close()


def test_file_size_stays_bounded_across_insert_and_purge_cycles(tmp_path: Path) -> None:
    store = Store(tmp_path)
    peaks, ledger_after = [], []
    for _ in range(8):
        seed(store.path, 3000, "SUCCESS", 40, text="y" * 500)
        peaks.append(store.file_size())
        report = retention.purge(store, clock.now(), Retention(30, 90))
        assert report.success == 3000 and report.vacuum == "incremental"
        ledger_after.append(store.path.stat().st_size)
    # Each purge gives the ledger's pages back; ledger + WAL never grow from cycle to cycle.
    assert max(ledger_after) <= 192 * 1024, ledger_after  # the schema's empty pages (45 in v7)
    # From the third cycle on: the second still settles the pages of messages_evolution_key
    # (random keys split pages in place; migration 4), after which the size is flat.
    assert max(peaks[2:]) <= peaks[2] * 1.1, peaks
    assert max(peaks) < 9 * 1024 * 1024, peaks
    store.close()


def test_a_ledger_without_auto_vacuum_reuses_its_pages_and_vacuum_turns_it_on(
    tmp_path: Path,
) -> None:
    # A ledger created before incremental auto-vacuum: the mode is fixed once the file has pages.
    with closing(sqlite3.connect(tmp_path / LEDGER_FILE)) as conn:
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("DROP TABLE t")
    store = Store(tmp_path)
    assert rows(store.path, "PRAGMA auto_vacuum") == [(0,)]
    sizes = []
    for _ in range(4):
        seed(store.path, 2000, "SUCCESS", 40)
        assert retention.purge(store, clock.now(), Retention(30, 90)).vacuum == "none"
        sizes.append(store.path.stat().st_size)
    assert max(sizes[1:]) <= sizes[0] * 1.1, sizes  # freed pages are reused, the file does not grow
    assert retention.reclaim(store, full=True) == "full"
    assert rows(store.path, "PRAGMA auto_vacuum") == [(2,)]
    assert store.path.stat().st_size < sizes[0] / 4
    store.close()


@pytest.mark.slow
def test_purge_command_reports_what_it_removed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Store(data_dir).close()
    path = data_dir / LEDGER_FILE
    seed(path, 12, "SUCCESS", 31)
    seed(path, 2, "SUCCESS", 8)
    seed(path, 3, "FAILURE", 91)
    add_idempotency(path, ":old", -1)
    env = daemon_env(EVOMSGD_DATA_DIR=str(data_dir), EVOMSGD_ERASE_TEXT_DAYS="7")

    dry = run("purge", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[:-1] == [
        "would remove 12 SUCCESS messages finished over 30 days ago",
        "would remove 3 FAILURE/EXPIRED/CANCELED messages finished over 90 days ago",
        "would remove 30 history events of those messages",
        "would erase the text of 2 messages finished over 7 days ago",
        "would remove 1 expired idempotency keys",
        "would remove 0 media files no message uses (0.0 MB to free)",
    ]
    assert re.fullmatch(r"dry run: nothing was changed \(ledger \d+\.\d MB\)", lines[-1])

    done = run("purge", "--keep-failed-days", "0", "--vacuum", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:-1] == [
        "removed 12 SUCCESS messages finished over 30 days ago",
        "kept every FAILURE/EXPIRED/CANCELED message (EVOMSGD_KEEP_FAILED_DAYS=0)",
        "removed 24 history events of those messages",
        "erased the text of 5 messages finished over 7 days ago",
        "removed 1 expired idempotency keys",
        "removed 0 media files no message uses (0.0 MB freed)",
    ]
    assert re.fullmatch(r"ledger \d+\.\d MB -> \d+\.\d MB \(VACUUM\) in \d+\.\d\ds", lines[-1])

    again = json.loads(run("purge", "--json", env=env).stdout)
    assert again["dry_run"] is False and again["failed"] == 3 and again["success"] == 0


@pytest.mark.slow
def test_purge_command_without_a_ledger_says_where_it_looked(tmp_path: Path) -> None:
    result = run("purge", env=daemon_env(EVOMSGD_DATA_DIR=str(tmp_path)))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: no ledger at {tmp_path / LEDGER_FILE} - nothing to purge (set "
        "EVOMSGD_DATA_DIR or --data-dir to the daemon's data directory)\n"
    )


@pytest.mark.slow
def test_purge_command_works_while_the_daemon_serves(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, free_port(), "--sandbox", EVOMSGD_PURGE_INTERVAL="0")
    try:
        old = seed(data_dir / LEDGER_FILE, 2500, "SUCCESS", 31)
        result = run("purge", env=daemon_env(EVOMSGD_DATA_DIR=str(data_dir)))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("removed 2500 SUCCESS messages")
        status, body = request(
            daemon.url + "/messages", {"phone": "+5511988887777", "message": "hi"}
        )
        assert status == 202, body
        wait_until(
            lambda: request(f"{daemon.url}/tasks/{body['task_id']}")[1]["status"] == "SUCCESS",
            10,
            "the daemon still sends",
        )
        assert request(f"{daemon.url}/tasks/{old[0]}")[0] == 404
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_the_daemon_purges_periodically(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, free_port(), "--sandbox", EVOMSGD_PURGE_INTERVAL="0.2")
    try:
        path = data_dir / LEDGER_FILE
        seed(path, 40, "SUCCESS", 31)
        young = seed(path, 3, "SUCCESS", 1)
        wait_until(
            lambda: {row[0] for row in rows(path, "SELECT id FROM messages")} == set(young),
            10,
            "old messages purged",
        )
        wait_until(lambda: "retention: removed 40 SUCCESS" in daemon.logs(), 10, "the log line")
    finally:
        assert daemon.stop() == 0


# -- media files (issue 16) -------------------------------------------------------------------


def test_purge_deletes_media_files_no_remaining_message_uses(tmp_path: Path) -> None:
    """A file goes with the last message that names it; orphans (a request that failed after
    storing its file) go too once old; a file just stored, not yet named, stays."""
    store = Store(tmp_path)
    files = MediaFiles(tmp_path)
    old_only, shared, orphan, fresh = (files.put(bytes([n]) * 1000) for n in range(4))
    long_ago = clock.now() - 40 * DAY
    for stored in (old_only, shared, orphan):
        os.utime(files.path(stored.sha256), (long_ago, long_ago))
    [old_a] = seed(store.path, 1, "SUCCESS", 31)
    [old_b] = seed(store.path, 1, "SUCCESS", 31)
    [young] = seed(store.path, 1, "SUCCESS", 2)
    with closing(sqlite3.connect(store.path)) as conn, conn:
        for task_id, stored in ((old_a, old_only), (old_b, shared), (young, shared)):
            conn.execute(
                "UPDATE messages SET media_type = 'document', media_sha256 = ?, media_size = ?"
                " WHERE id = ?",
                (stored.sha256, stored.size, task_id),
            )
    policy = Retention(success_days=30, failed_days=90, erase_text_days=None)

    dry = retention.purge(store, clock.now(), policy, dry_run=True)
    assert (dry.media_files, dry.media_bytes) == (2, 2000)
    assert all(files.path(s.sha256).exists() for s in (old_only, shared, orphan, fresh))

    report = retention.purge(store, clock.now(), policy)
    assert (report.success, report.media_files, report.media_bytes) == (2, 2, 2000)
    assert not files.path(old_only.sha256).exists() and not files.path(orphan.sha256).exists()
    assert files.path(shared.sha256).exists() and files.path(fresh.sha256).exists()

    # The last message naming the shared file goes: so does the file.
    later = clock.now() + 40 * DAY
    final = retention.purge(store, later, policy)
    assert (final.success, final.media_files, final.media_bytes) == (1, 2, 2000)
    # ... and the file stored without a row, old by now, is an orphan.
    assert not files.path(shared.sha256).exists() and not files.path(fresh.sha256).exists()
    store.close()
