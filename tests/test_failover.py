"""Failover against real processes: a daemon replicating to a file:// replica is killed -9 with
its Litestream mid-stream, the ledger is restored elsewhere and a second daemon carries on; and a
replica that stops taking writes never slows POST /messages, and catches up when it is back."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from evomsgd.engine.replication import MONITOR_INTERVAL
from tests.conftest import ROOT, FakeProcess, daemon_env, free_port, wait_until
from tests.test_e2e import (
    FINAL,
    Daemon,
    Stream,
    evolution_env,
    fake_proc,
    ledger_rows,
    phone,
    request,
)

pytestmark = pytest.mark.slow
__all__ = ["fake_proc"]  # a fixture, used by name

SYNC_INTERVAL = 1.0  # Litestream's default, and evomsgd's
# A commit is on the replica after Litestream's next look at the WAL and the upload after it;
# the upload itself (one small file here) is given half a second on this shared machine.
LOSS_BOUND = SYNC_INTERVAL + MONITOR_INTERVAL + 0.5


def restore(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evomsgd", "restore", "--from", url, "--data-dir", str(data_dir)],
        cwd=ROOT,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def integrity(data_dir: Path) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "evomsgd.db")) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def replication(daemon: Daemon) -> dict[str, Any]:
    status, body = request(daemon.url + "/health")
    assert status in (200, 503), body
    view: dict[str, Any] = body["replication"]
    return view


def test_kill_9_with_litestream_then_restore_elsewhere_and_carry_on(
    tmp_path: Path, fake_proc: FakeProcess
) -> None:
    url = f"file://{tmp_path}/replica"
    env = evolution_env(fake_proc) | {"EVOMSGD_REPLICA_URL": url}
    primary = Daemon(tmp_path / "primary", free_port(), **env)
    wait_until(lambda: replication(primary)["state"] == "replicating", 30, "replicating")
    stream = Stream(primary.url, 0)
    wait_until(lambda: len(stream.accepted) >= 400, 60, "400 accepted messages")
    litestream = replication(primary)["pid"]
    primary.proc.kill()  # SIGKILL: no drain, no final upload
    os.kill(litestream, signal.SIGKILL)
    killed = time.monotonic()
    primary.proc.wait(10)
    primary.log.close()
    stream.stop()
    assert stream.refused == []

    secondary = tmp_path / "secondary"
    done = restore(url, secondary)
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout
    assert integrity(secondary) == "ok"
    rows = ledger_rows(secondary)
    lost = {t: stream.answered_at[t] for t in stream.accepted if t not in rows}
    ages = sorted(round(killed - at, 3) for at in lost.values())
    print(
        f"accepted {len(stream.accepted)}, on the replica {len(stream.accepted) - len(lost)}, "
        f"lost {len(lost)}; the oldest lost was accepted {ages[-1] if ages else 0}s before the kill"
    )
    # Every message accepted more than a sync interval (and Litestream's WAL look) before the
    # kill is on the replica; what is lost is the last moments only.
    assert all(age <= LOSS_BOUND for age in ages), ages

    port = free_port()
    carry_on = Daemon(secondary, port, **evolution_env(fake_proc))
    try:
        restored = [t for t in stream.accepted if t in rows]

        def all_final() -> bool:
            now = ledger_rows(secondary)
            return all(now[t]["status"] in FINAL for t in restored)

        wait_until(all_final, 120, "every restored message to finish")
        now = ledger_rows(secondary)
        assert {now[t]["status"] for t in restored} == {"SUCCESS"}
        sent = Counter(r["number"] for r in fake_proc.received() if r["delivered"])
        for task_id in restored:
            index = stream.accepted[task_id]
            assert sent[phone(index).lstrip("+")] >= 1, task_id
        # Sent twice only where the ledger says it may have been: in flight, or due when the
        # replica may have missed its send; each such message was looked up first.
        twice = {n for n, c in sent.items() if c > 1}
        flagged = {now[t]["phone"] for t in restored if now[t]["recovered"] or now[t]["ambiguous"]}
        assert twice <= flagged
        print(f"sent twice {len(twice)}, flagged {len(flagged)}")
    finally:
        assert carry_on.stop() == 0


def test_an_unwritable_replica_never_slows_accepting_and_catches_up(
    tmp_path: Path, fake_proc: FakeProcess
) -> None:
    replica = tmp_path / "replica"
    url = f"file://{replica}"
    env = evolution_env(fake_proc) | {"EVOMSGD_REPLICA_URL": url}
    daemon = Daemon(tmp_path / "data", free_port(), **env)
    try:
        wait_until(lambda: replication(daemon)["state"] == "replicating", 30, "replicating")
        # Root ignores file modes, so the directory is made unusable the way a lost mount is:
        # something else is at its path, and every write below it fails (ENOTDIR).
        replica.rename(tmp_path / "replica.away")
        replica.write_text("not a directory")
        later = []
        for i in range(200):
            status, body = request(
                daemon.url + "/messages", {"phone": phone(10_000 + i), "message": f"later-{i}"}
            )
            assert status == 202, body  # no error, no backpressure: the replica is not in the path
            later.append(body["task_id"])
        wait_until(lambda: replication(daemon)["state"] == "failing", 60, "failing to be reported")
        status, health = request(daemon.url + "/health")
        assert health["status"] == "degraded"
        assert any(p.startswith(f"replication to {url} is failing") for p in health["problems"])

        replica.unlink()
        (tmp_path / "replica.away").rename(replica)
        attempt = 0

        def restored_has_them() -> bool:
            nonlocal attempt
            attempt += 1
            target = tmp_path / f"restored-{attempt}"
            done = restore(url, target)
            if done.returncode != 0:
                return False
            assert integrity(target) == "ok"
            return set(later) <= set(ledger_rows(target))

        # Litestream retries with a backoff that doubles from the sync interval.
        wait_until(restored_has_them, 180, "the replica to hold the later messages")
        wait_until(lambda: replication(daemon)["state"] == "replicating", 60, "replicating again")
    finally:
        assert daemon.stop() == 0
