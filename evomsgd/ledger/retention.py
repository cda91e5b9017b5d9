"""Retention's SQL: delete finished messages past their days, erase old texts, reclaim the space.

Every change runs in short transactions of `batch` rows with a pause between them, so the
daemon's writers never wait long; when to purge is the engine's business (engine/purger.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from evomsgd import clock
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.deliveries import FAILED, status_in
from evomsgd.ledger.media import MediaFiles
from evomsgd.ledger.records import PurgeReport, Retention
from evomsgd.ledger.store import Store
from evomsgd.models import FINAL

_DAY = 86_400.0


def purge(
    store: Store,
    now: float,
    policy: Retention,
    *,
    dry_run: bool = False,
    batch: int = 1000,
    stop: Callable[[], bool] = lambda: False,
) -> PurgeReport:
    """Delete finished messages past retention (with their events and the media files no other
    message uses), erase old texts, drop expired idempotency keys; `batch` rows per short transaction so other writers never wait
    long. `stop` is asked between batches (the daemon is shutting down)."""
    started = time.monotonic()
    report = PurgeReport(dry_run=dry_run, bytes_before=store.file_size())
    classes = [
        # `+status`: walk the finished_at index (old rows only), not every row of a status.
        ("success", "+status = 'SUCCESS'", policy.success_days),
        ("failed", f"+status IN {status_in(FAILED)}", policy.failed_days),
    ]
    deleting: list[tuple[str, str]] = []  # (condition, cutoff) of each class purged
    for name, status_sql, days in classes:
        if days <= 0:
            continue
        where = f"finished_at IS NOT NULL AND finished_at < ? AND {status_sql}"
        cutoff = clock.to_db(now - days * _DAY)
        deleting.append((where, cutoff))
        if dry_run:
            count, events = store.query(
                f"SELECT count(*), (SELECT count(*) FROM events WHERE message_id IN"
                f" (SELECT id FROM messages WHERE {where})) FROM messages WHERE {where}",
                (cutoff, cutoff),
            )[0]
        else:
            count, events = _delete_finished(store, where, cutoff, batch, stop)
        setattr(report, name, count)
        report.events += events
    if policy.erase_text_days is not None:
        where = (
            "finished_at IS NOT NULL AND finished_at < ? AND text IS NOT NULL"
            f" AND +status IN {status_in(FINAL)}"
        )
        cutoff = clock.to_db(now - policy.erase_text_days * _DAY)
        # A dry run counts only the texts of rows the deletions above would leave.
        spared = "".join(f" AND NOT ({cond})" for cond, _ in deleting)
        report.texts_erased = _batched(
            store,
            f"UPDATE messages SET text = NULL WHERE seq IN"
            f" (SELECT seq FROM messages WHERE {where} LIMIT ?)",
            f"SELECT count(*) FROM messages WHERE {where}{spared}",
            (cutoff,),
            dry_run,
            batch,
            stop,
            count_params=(cutoff, *(c for _, c in deleting)),
        )
    report.idempotency = _batched(
        store,
        "DELETE FROM idempotency WHERE rowid IN"
        " (SELECT rowid FROM idempotency WHERE expires_at <= ? LIMIT ?)",
        "SELECT count(*) FROM idempotency WHERE expires_at <= ?",
        (clock.to_db(now),),
        dry_run,
        batch,
        stop,
    )
    if not dry_run and policy.success_days > 0:
        # Callbacks of no message (instance events, relayed webhooks) once sent or given up.
        _batched(
            store,
            "DELETE FROM callbacks WHERE id IN (SELECT id FROM callbacks WHERE message_id IS NULL"
            " AND state != 'pending' AND occurred_at < ? LIMIT ?)",
            "",
            (clock.to_db(now - policy.success_days * _DAY),),
            False,
            batch,
            stop,
        )
    report.media_files, report.media_bytes = _purge_media(store, now, deleting, dry_run)
    if not dry_run and report.success + report.failed + report.idempotency:
        report.vacuum = reclaim(store, stop=stop)
    report.bytes_after = store.file_size()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _purge_media(
    store: Store, now: float, deleting: list[tuple[str, str]], dry_run: bool
) -> tuple[int, int]:
    """Delete the media files no message names any more (those of the messages just deleted,
    and orphans); a dry run counts what the deletions above would leave unnamed. Files younger
    than ORPHAN_GRACE are kept: one may belong to a message being accepted right now."""
    files = MediaFiles(store.data_dir)
    if not files.root.is_dir():
        return 0, 0
    spared = "".join(f" AND NOT ({cond})" for cond, _ in deleting) if dry_run else ""
    params = tuple(cutoff for _, cutoff in deleting) if dry_run else ()
    referenced = {
        row[0]
        for row in store.query(
            f"SELECT DISTINCT media_sha256 FROM messages WHERE media_sha256 IS NOT NULL{spared}",
            params,
        )
    }
    orphans = files.orphans(referenced, now)
    if dry_run:
        return len(orphans), sum(size for _, size in orphans)
    freed = [files.delete(sha256) for sha256, _ in orphans]
    return len(freed), sum(freed)


def _delete_finished(
    store: Store, where: str, cutoff: str, batch: int, stop: Callable[[], bool]
) -> tuple[int, int]:
    messages = events = 0
    while not stop():
        held = time.monotonic()
        with store.transaction() as cur:
            ids = [
                (row[0],)
                for row in cur.execute(
                    f"SELECT id FROM messages WHERE {where} LIMIT ?", (cutoff, batch)
                )
            ]
            cur.executemany("DELETE FROM events WHERE message_id = ?", ids)
            events += max(cur.rowcount, 0)
            # Their delivered (or given-up) callbacks go too; one still owed is kept and sent.
            cur.executemany(
                "DELETE FROM callbacks WHERE message_id = ? AND state != 'pending'", ids
            )
            cur.executemany("DELETE FROM messages WHERE id = ?", ids)
            messages += max(cur.rowcount, 0)
        if len(ids) < batch:
            break
        _step_aside(held)
    return messages, events


def _batched(
    store: Store,
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
        return int(store.query(count, params if count_params is None else count_params)[0][0])
    total = 0
    while not stop():
        held = time.monotonic()
        with store.transaction() as cur:
            cur.execute(change, (*params, batch))
            changed = max(cur.rowcount, 0)
        total += changed
        if changed < batch:
            break
        _step_aside(held)
    return total


def reclaim(
    store: Store, *, full: bool = False, pages: int = 2048, stop: Callable[[], bool] = lambda: False
) -> str:
    """Give free pages back to the filesystem: `incremental_vacuum` in short steps when the
    file allows it, or (full) a VACUUM that rewrites the file, blocking writers meanwhile,
    and turns incremental auto-vacuum on for later purges. Returns what was done."""
    if full:
        try:
            store.run_script("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"VACUUM failed: {exc} ({store.path})") from exc
        done = "full"
    elif store.query("PRAGMA auto_vacuum")[0][0] == 2:
        while not stop() and store.query("PRAGMA freelist_count")[0][0] > 0:
            held = time.monotonic()
            # A script steps the pragma to its end: a cursor's execute() frees a single page.
            try:
                store.run_script(
                    f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({int(pages)}); COMMIT;"
                )
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(
                    f"the ledger cannot be written: {exc} ({store.path})"
                ) from exc
            _step_aside(held)
        done = "incremental"
    else:
        return "none"
    # In WAL mode the file shrinks when a checkpoint copies the last commit back; PASSIVE
    # never waits for readers or blocks writers (if it cannot finish, a later one will).
    # Under Litestream the checkpoint is its own (database.py): the file shrinks at its next one.
    if store.replicated:
        return done
    with contextlib.suppress(sqlite3.OperationalError):
        store.run_script("PRAGMA wal_checkpoint(PASSIVE);")
    return done


def _step_aside(held_since: float) -> None:
    """Pause between two purge batches as long as the last one held the write lock (at most
    50 ms): neither SQLite's busy handler nor a thread lock is fair, and back-to-back batches
    would starve the daemon's writers; this way a purge takes at most half the write time."""
    time.sleep(min(time.monotonic() - held_since, 0.05))
