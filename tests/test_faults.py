"""Fault tests: a locked or full ledger, lost leases, retry policy, idempotency across a restart."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from evomsgd import clock
from evomsgd.engine.rules import decide
from evomsgd.evolution.client import EvolutionClient
from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome
from evomsgd.ledger.records import Message
from evomsgd.models import Status
from evomsgd.web.api import SERVICE
from tests.conftest import (
    API_KEY,
    FakeProcess,
    MakeClient,
    fast_settings,
    free_port,
    post,
    wait_status,
    wait_until,
)
from tests.fake_evolution import FakeEvolution
from tests.test_e2e import Daemon, evolution_env, ledger_rows, phone, request, serve_refused


def _message(**overrides: Any) -> Message:
    values: dict[str, Any] = dict(
        seq=1,
        id="m",
        status=Status.STARTED,
        instance="shop",
        phone="55",
        phone_input="+55",
        text="x",
        priority=0,
        created_at="",
        send_at=None,
        next_attempt_at=None,
        expires_at="",
        attempts=1,
        retries_used=0,
        ambiguous=0,
        recovered=0,
        lease_until=None,
        started_at="",
        finished_at=None,
        last_error=None,
        error_kind=None,
        evolution_key=None,
        remote_jid=None,
        sandbox=False,
        idempotency_key=None,
        token_name=None,
    )
    values.update(overrides)
    return Message(**values)


def test_exponential_backoff_with_jitter() -> None:
    settings = fast_settings(retry_delay=2.0, retry_backoff=2.0, retry_jitter=0.5, max_retries=5)
    transient = SendOutcome(OutcomeKind.TRANSIENT, "boom")
    rng = random.Random(3)
    delays = []
    for used in range(5):
        tr, _ = decide(
            _message(retries_used=used, attempts=used + 1), transient, 100.0, settings, rng
        )
        assert tr.status == Status.RETRY and tr.spend_retry
        delays.append(tr.next_attempt_at - 100.0)  # type: ignore[operator]
    for used, delay in enumerate(delays):
        assert 2.0 * 2**used <= delay <= 2.0 * 2**used + 0.5
    final, _ = decide(_message(retries_used=5, attempts=6), transient, 100.0, settings, rng)
    assert final.status == Status.FAILURE and final.detail == "gave up after 6 attempts: boom"


def test_ambiguous_policy_is_configurable() -> None:
    drop = SendOutcome(OutcomeKind.AMBIGUOUS, "connection reset after sending")
    never = fast_settings(ambiguous_retries=0)
    tr, _ = decide(_message(), drop, 0.0, never, random.Random())
    assert tr.status == Status.FAILURE and tr.ambiguous
    assert tr.detail == (
        "connection reset after sending - it may have been delivered; not sent again to "
        "avoid a duplicate"
    )
    # a crash recovery is not counted against the policy: the resend after a crash is owed
    tr, _ = decide(
        _message(ambiguous=1, recovered=1),
        drop,
        0.0,
        fast_settings(ambiguous_retries=1),
        random.Random(),
    )
    assert tr.status == Status.RETRY


async def test_a_lost_lease_is_swept_back_and_sent(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", json={})
    accepted = await post(client)
    store = client.app[SERVICE].store
    # A worker that claimed the message and then hung: its lease runs out in 0.2 s.
    assert store.claim(accepted["task_id"], clock.now(), lease=0.2) is not None
    await client.post("/instances/main/resume", json={})
    task = await wait_status(client, accepted["task_id"])
    assert task["status"] == "SUCCESS"
    assert (
        task["result"]["recovered_after_crash"] == 1
        and task["result"]["possibly_duplicated"] is True
    )
    # Nothing was sent under that lease, so the look-up finds nothing and it is sent.
    assert [h["event"] for h in task["history"]] == ["recovered", "lookup", "attempt"]
    assert "lease expired" in task["history"][0]["detail"]
    assert task["history"][1]["detail"].startswith("not among Evolution's messages to ")
    assert len(fake.received) == 1


async def test_a_send_cut_by_a_crash_that_evolution_has_is_found_not_sent_again(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await client.post("/instances/main/pause", json={})
    accepted = await post(client, message="Your code is 424242")
    store = client.app[SERVICE].store
    # A worker claimed it and sent it; Evolution stored it; the daemon died before recording
    # the 201: the row stays STARTED until its lease runs out.
    assert store.claim(accepted["task_id"], clock.now(), lease=0.2) is not None
    async with aiohttp.ClientSession() as session:
        sent = await EvolutionClient(session, fake.url, API_KEY).send_text(
            "main", "5511988887777", "Your code is 424242"
        )
    assert sent.kind is OutcomeKind.SENT
    await client.post("/instances/main/resume", json={})
    task = await wait_status(client, accepted["task_id"])
    assert task["status"] == "SUCCESS"
    assert [(h["event"], h["outcome"]) for h in task["history"]] == [
        ("recovered", None),
        ("attempt", "found"),
    ]
    assert task["result"]["evolution_key"] == sent.key_id
    assert task["result"]["recovered_after_crash"] == 1
    assert "possibly_duplicated" not in task["result"]
    assert len(fake.received) == 1  # not sent again


async def test_a_full_disk_answers_503_and_recovers(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    before = await post(client)
    store = client.app[SERVICE].store
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "disk full"
    try:
        accepted = 0
        for i in range(200):
            resp = await client.post("/messages", json={"phone": phone(i), "message": "x" * 2000})
            if resp.status == 503:
                body = await resp.json()
                assert body["error"]["code"] == "store_unavailable"
                assert "database or disk is full" in body["error"]["message"]
                assert resp.headers["Retry-After"] == "5"
                break
            accepted += 1
        else:
            pytest.fail("the ledger never filled up")
        for i in range(3):  # still full
            resp = await client.post("/messages", json={"phone": phone(i), "message": "x" * 2000})
            assert resp.status == 503
    finally:
        store._conn.execute("PRAGMA max_page_count=1073741823")
    after = await post(client)
    # The operator hears of it once (not once per refused request), and of the recovery.
    logged = [r.getMessage() for r in caplog.records if r.name == "evomsgd.commit"]
    assert len(logged) == 2, logged
    assert logged[0].startswith("refusing new messages (503): the ledger cannot be written: ")
    assert logged[1] == "the ledger takes writes again (messages refused meanwhile: 4)"
    for task_id in (before["task_id"], after["task_id"]):
        assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    with sqlite3.connect(tmp_path / "evomsgd.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == accepted + 2


@pytest.mark.slow
def test_an_operator_holding_the_write_lock_for_10s_loses_nothing(tmp_path: Path) -> None:
    fake = FakeProcess("--instances", "main")
    data_dir = tmp_path / "data"
    daemon = Daemon(
        data_dir,
        free_port(),
        EVOLUTION_API_URL=fake.url,
        EVOLUTION_API_KEY=API_KEY,
        EVOLUTION_INSTANCE_NAME="main",
        EVOMSGD_SEND_INTERVAL="0",
    )
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            status, body = request(
                daemon.url + "/messages", {"phone": phone(i), "message": "during the lock"}
            )
            (accepted.append(body["task_id"]) if status == 202 else refused.append(status))
            i += 1

    try:
        operator = sqlite3.connect(data_dir / "evomsgd.db", isolation_level=None)
        operator.execute("BEGIN IMMEDIATE")  # what `sqlite3` does during a long manual UPDATE
        writer = threading.Thread(target=stream)
        writer.start()
        time.sleep(10)  # the operator's lock: the point of the test is its duration
        operator.execute("ROLLBACK")
        operator.close()
        wait_until(lambda: len(accepted) >= 20, 20, "new messages accepted after the lock")
        stop.set()
        writer.join(30)
        assert set(refused) <= {503}
        wait_until(
            lambda: all(ledger_rows(data_dir)[t]["status"] == "SUCCESS" for t in accepted),
            60,
            "all sent",
        )
        with sqlite3.connect(data_dir / "evomsgd.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert daemon.healthy()
    finally:
        stop.set()
        daemon.stop()
        fake.stop()


@pytest.mark.slow
def test_idempotency_survives_a_crash(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    body = {"phone": "+5511988887777", "message": "Order 7 shipped", "instance_name": "shop"}
    daemon = Daemon(data_dir, port, "--sandbox")
    req = lambda payload: _post_with_key(daemon.url, payload, "order-7")  # noqa: E731
    status, first = req(body)
    assert status == 202
    daemon.proc.kill()
    daemon.proc.wait(10)
    daemon = Daemon(data_dir, port, "--sandbox")
    try:
        status, again = req(body)
        assert status == 200 and again["task_id"] == first["task_id"]
        status, conflict = req({**body, "message": "Order 8 shipped"})
        assert status == 409 and conflict["error"]["code"] == "idempotency_conflict"
        assert len(ledger_rows(data_dir)) == 1
    finally:
        daemon.stop()


def _post_with_key(url: str, payload: dict[str, Any], key: str) -> tuple[int, Any]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url + "/messages",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_a_read_only_data_directory_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Starting on a read-only mount; the next test turns one read-only under a running daemon."""
    data_dir = tmp_path / "data"
    Daemon(data_dir, free_port(), "--sandbox").stop()  # a ledger that exists
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "--bind", str(data_dir), str(data_dir)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root and bind mounts to make the data directory read-only")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(data_dir)], check=True, capture_output=True
        )
        result = serve_refused("--sandbox", "--data-dir", str(data_dir))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"error: data directory {data_dir} is on a read-only file system - remount it read-write "
            "or set EVOMSGD_DATA_DIR"
        )
    finally:
        subprocess.run(["umount", str(data_dir)], capture_output=True)
    with sqlite3.connect(data_dir / "evomsgd.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@contextlib.contextmanager
def ext4_volume(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh ext4 file system on a loop device, mounted with errors=remount-ro; yields the
    mount point and the sysfs file that makes the kernel force it read-only. Skips without root
    or loop devices."""
    image, mount = tmp_path / "volume.img", tmp_path / "volume"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    steps = [
        ["mkfs.ext4", "-q", "-F", str(image)],
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)],
    ]
    for step in steps:
        if os.geteuid() != 0 or subprocess.run(step, capture_output=True).returncode != 0:
            pytest.skip("needs root, mkfs.ext4 and a loop device to make a file system fail")
    try:
        device = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(mount)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger}")
        yield mount, trigger
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _refuses_writes(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return True
    (directory / "probe").unlink()
    return False


def test_a_data_directory_that_turns_read_only_under_the_daemon(tmp_path: Path) -> None:
    """What a failing disk does: ext4 (errors=remount-ro) forces itself read-only while the
    daemon's ledger, WAL and queue files are open for writing. A plain remount cannot do that
    ("busy"); the kernel's own error path can."""
    args = ("--sandbox", "--instance", "main")
    with (
        ext4_volume(tmp_path) as (data_dir, trigger),  # its parent, tmp_path, keeps the logs
        running(Daemon(data_dir, free_port(), *args, EVOMSGD_SEND_INTERVAL="0")) as daemon,
    ):
        sent = [post_one(daemon, i) for i in range(5)]
        wait_until(lambda: statuses(data_dir, sent) == {"SUCCESS"}, 10, "5 sent")
        assert request(daemon.url + "/instances/main/pause", method="POST")[0] == 200
        waiting = [post_one(daemon, i) for i in range(5, 25)]

        trigger.write_text("evomsgd fault test\n")
        wait_until(lambda: _refuses_writes(data_dir), 5, "the file system to turn read-only")

        status, body = request(daemon.url + "/messages", {"phone": phone(99), "message": "x"})
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
        assert (
            f"data directory {data_dir} is on a read-only file system" in body["error"]["message"]
        )
        assert request(daemon.url + f"/tasks/{waiting[0]}")[1]["status"] == "PENDING"
        status, health = request(daemon.url + "/health")
        assert (status, health["status"], health["database_writable"]) == (503, "down", False)
        assert any("read-only file system" in p for p in health["problems"]), health
        assert daemon.stop(timeout=45) == 0
        assert "refusing new messages (503)" in daemon.logs()

    with repaired(tmp_path, data_dir):
        with contextlib.closing(sqlite3.connect(data_dir / "evomsgd.db")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with running(Daemon(data_dir, free_port(), *args, EVOMSGD_SEND_INTERVAL="0")) as daemon:
            assert request(daemon.url + "/instances/main/resume", method="POST")[0] == 200
            wait_until(lambda: statuses(data_dir, waiting) == {"SUCCESS"}, 20, "the rest sent")
            # Every 202 is there, once; the refused message was never written.
            assert set(ledger_rows(data_dir)) == set(sent) | set(waiting)


def test_a_send_in_flight_when_the_disk_fails_is_found_after_the_repair_not_lost(
    tmp_path: Path,
) -> None:
    """Evolution answers after the file system turned read-only: the outcome cannot be written.
    The worker must not sit out the drain retrying a write that cannot succeed, and the message
    must come back after the repair rather than vanish: looked up in Evolution, which has it, so
    it is not sent twice."""
    fake = FakeProcess("--instances", "main")
    number = phone(7)
    request(fake.url + "/_fake/script", {"number": number, "responses": ["hang"]}, "POST")
    try:
        with (
            ext4_volume(tmp_path) as (data_dir, trigger),
            running(Daemon(data_dir, free_port(), **evolution_env(fake))) as daemon,
        ):
            task = post_one(daemon, 7)
            wait_until(lambda: fake.received(), 10, "the send to reach Evolution")
            trigger.write_text("evomsgd fault test\n")
            wait_until(lambda: _refuses_writes(data_dir), 5, "the file system to turn read-only")
            request(fake.url + "/_fake/release", method="POST")  # Evolution answers 201 now
            wait_until(lambda: "cannot record it" in daemon.logs(), 10, "the unrecorded outcome")
            assert daemon.stop(timeout=45) == 0
            # The worker gave up on the unwritable outcome instead of sitting out the drain.
            assert "drain timeout" not in daemon.logs()
            line = next(x for x in daemon.logs().splitlines() if "cannot record it" in x)
            assert f"task {task} instance main: attempt 1 ended sent" in line
            assert "flagged as a possible duplicate" in line

        with (
            repaired(tmp_path, data_dir),
            running(Daemon(data_dir, free_port(), **evolution_env(fake))) as daemon,
        ):
            wait_until(lambda: statuses(data_dir, [task]) == {"SUCCESS"}, 20, "looked up")
            row = ledger_rows(data_dir)[task]
            assert row["recovered"] == 1
            # Evolution had it (its 201 was what could not be recorded): found, not sent again.
            assert row["error_kind"] == "found"
            assert [r["number"] for r in fake.received()].count(number.lstrip("+")) == 1
            daemon.stop()
    finally:
        fake.stop()


@contextlib.contextmanager
def repaired(tmp_path: Path, mount: Path) -> Iterator[None]:
    """The operator's fix after ext4_volume(): fsck, then mount again (the kernel will not make
    the file system writable in place); unmounted on the way out."""
    image = tmp_path / "volume.img"
    wait_until(  # the loop device lets go of the image a moment after the unmount
        lambda: not subprocess.run(["losetup", "-j", str(image)], capture_output=True).stdout,
        10,
        "the loop device to be released",
    )
    assert subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True).returncode in (0, 1)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon, killed on the way out if the test did not stop it (a failed assertion)."""
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def post_one(daemon: Daemon, i: int) -> str:
    status, body = request(daemon.url + "/messages", {"phone": phone(i), "message": "x"})
    assert status == 202, body
    return str(body["task_id"])


def statuses(data_dir: Path, task_ids: list[str]) -> set[str]:
    rows = ledger_rows(data_dir)
    return {rows[t]["status"] for t in task_ids}
