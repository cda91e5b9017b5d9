"""`evomsgd serve`: prepare the data directory, run the app, drain once on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import os
import resource
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from aiohttp import web

from evomsgd import __version__, systemd
from evomsgd.app import create_app
from evomsgd.config import Settings
from evomsgd.errors import DataDirError
from evomsgd.ledger.store import LEDGER_FILE, Store
from evomsgd.web.api import SERVICE
from evomsgd.web.guards import check_bind
from evomsgd.web.server import Runner, http_limits

log = logging.getLogger("evomsgd.daemon")

LOCK_FILE = "evomsgd.lock"


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory owner-only (0700); refuse one we cannot write."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DataDirError(
            f"cannot create data directory {path}: {exc.strerror} - "
            "set EVOMSGD_DATA_DIR or --data-dir to a writable directory"
        ) from None
    try:
        if path.stat().st_uid == os.getuid():
            os.chmod(path, 0o700)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise DataDirError(f"cannot use data directory {path}: {exc.strerror}") from None
        writable = False
    if not writable:
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
        raise DataDirError(
            f"data directory {path} is on a read-only file system - remount it read-write "
            "or set EVOMSGD_DATA_DIR"
            if read_only
            else f"data directory {path} is not writable by this user - fix its owner "
            "or set EVOMSGD_DATA_DIR"
        )
    return path


def open_ledger(data_dir: Path, *, replicated: bool = False) -> Store:
    """The ledger for a command run beside the daemon (SQLite shares the file; up or down).

    `replicated`: Litestream replicates it (EVOMSGD_REPLICA_URL), so this connection leaves
    checkpoints to Litestream as the daemon's do."""
    os.umask(0o077)
    prepare_data_dir(data_dir)
    try:
        return Store(data_dir, replicated=replicated)
    except sqlite3.Error as exc:
        raise DataDirError(
            f"cannot open the ledger in {data_dir}: {exc} - run this as the daemon's user "
            "or set EVOMSGD_DATA_DIR / --data-dir"
        ) from None


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's lock: a second daemon on the same ledger would double-send."""
    lock_path = data_dir / LOCK_FILE
    handle: IO[str] = open(lock_path, "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise DataDirError(
                f"another evomsgd (pid {holder}) is already serving {data_dir} - stop it first, "
                "or give this one its own --data-dir"
            ) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


# Files the daemon keeps open besides one socket per send in flight: the ledger and its WAL, the
# queue file, readers, clients of the API, the listening socket.
FILES_BESIDES_SENDS = 256


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise the soft limit on open files towards `needed` (within the hard limit); returns
    (soft, hard) as they are now. Each send in flight holds a socket, and many systems still
    start a process with a soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # a seccomp filter may forbid it: say so below
            log.debug("cannot raise the open-files limit: %s", exc)
    return soft, hard


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`); False where the
    C library has none (musl). Start-up builds pydantic schemas, the OpenAPI document and the
    migrations' work and frees them, but glibc keeps freed pages mapped until asked."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def serve(settings: Settings, data_dir: Path) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    os.umask(0o077)  # every file we create (ledger, WAL, queue) is owner-only
    needed = settings.max_in_flight + FILES_BESIDES_SENDS
    soft, _ = raise_open_files(needed)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open files are limited to %s, fewer than EVOMSGD_MAX_IN_FLIGHT=%s sends need (%s) - "
            "raise LimitNOFILE in the unit or ulimit -n, or lower EVOMSGD_MAX_IN_FLIGHT",
            soft,
            settings.max_in_flight,
            needed,
        )
    check_bind(settings, _count_tokens(data_dir))  # before a refused start creates anything
    prepare_data_dir(data_dir)
    with exclusive(data_dir):
        return asyncio.run(_serve(settings, data_dir))


def _count_tokens(data_dir: Path) -> int:
    if not (data_dir / LEDGER_FILE).exists():
        return 0
    store = open_ledger(data_dir)
    try:
        return len(store.tokens())
    finally:
        store.close()


async def _serve(settings: Settings, data_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            log.info(
                "received %s: draining (at most %gs)",
                signal.Signals(signum).name,
                settings.drain_timeout,
            )
            systemd.stopping(settings.drain_timeout)
            stop.set()
        else:
            # aiohttp's run_app would abort its cleanup here and cancel in-flight sends; we don't.
            log.warning(
                "received %s again: already draining, in-flight sends are finishing",
                signal.Signals(signum).name,
            )

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    interval = systemd.watchdog_interval()
    watchdog = asyncio.create_task(systemd.watchdog(interval)) if interval else None

    app = create_app(settings, data_dir)
    runner = Runner(
        app,
        handle_signals=False,
        access_log=None,  # an access log line could carry tokens in a URL; never written
        shutdown_timeout=settings.drain_timeout,
        **http_limits(settings),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=512)
        try:
            await site.start()
        except OSError as exc:
            log.error(
                "cannot listen on %s:%s: %s - is another program using the port? set EVOMSGD_PORT",
                settings.host,
                settings.port,
                exc.strerror,
            )
            return 2
        if settings.sandbox:
            log.warning(
                "SANDBOX MODE: messages are recorded in the ledger and never sent to Evolution"
            )
        log.info(
            "evomsgd %s listening on http://%s:%s (data %s, %s workers)",
            __version__,
            settings.host,
            settings.port,
            data_dir,
            settings.workers,
        )
        systemd.ready(f"listening on {site.name}")
        release_free_memory()  # about 1 MB of an idle daemon's 60
        await stop.wait()
        app[SERVICE].drain()
    finally:
        await runner.cleanup()
        if watchdog is not None:
            watchdog.cancel()
    log.info("stopped")
    return 0
