"""End to end: real `evomsgd serve` processes, a fake Evolution process, kill -9 and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, ROOT, FakeProcess, daemon_env, free_port, wait_until

pytestmark = pytest.mark.slow

FINAL = {"SUCCESS", "FAILURE", "CANCELED", "EXPIRED"}


class Daemon:
    """One `evomsgd serve` process on a data directory."""

    def __init__(
        self, data_dir: Path, port: int, *args: str, token: str | None = None, **env: str
    ) -> None:
        self.data_dir, self.port, self.token = data_dir, port, token
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(data_dir.parent / f"daemon-{port}.log", "ab")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "evomsgd",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=daemon_env(**env), stdout=self.log, stderr=self.log
        )
        wait_until(self.healthy, 20, "daemon /health")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.logs()}")
        try:
            return request(self.url + "/health", token=self.token)[0] == 200
        except OSError:
            return False

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.data_dir.parent / f"daemon-{self.port}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code


def serve_refused(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an `evomsgd serve` that is expected to refuse to start, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "evomsgd", "serve", *args],
        cwd=ROOT,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def request(
    url: str, body: Any = None, method: str | None = None, token: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def phone(i: int) -> str:
    return f"+5511{988000000 + i}"


@pytest.fixture
def fake_proc() -> Iterator[FakeProcess]:
    fake = FakeProcess("--instances", "main", "--latency", "0.005")
    yield fake
    fake.stop()


def evolution_env(fake: FakeProcess) -> dict[str, str]:
    return {
        "EVOLUTION_API_URL": fake.url,
        "EVOLUTION_API_KEY": API_KEY,
        "EVOLUTION_INSTANCE_NAME": "main",
        "EVOMSGD_SEND_INTERVAL": "0",
        "EVOMSGD_WORKERS": "4",
        "EVOMSGD_RETRY_DELAY": "0.1",
        "EVOMSGD_PROBE_INTERVAL": "0.5",
    }


def ledger_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    # closing(): sqlite3's own context manager commits but leaves the file open.
    with contextlib.closing(sqlite3.connect(data_dir / "evomsgd.db")) as conn:
        conn.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM messages")}


class Stream:
    """Posts messages from a thread until told to stop; remembers what was accepted (202), when
    each 202 came back (monotonic seconds), and the status of each refusal."""

    def __init__(self, url: str, start: int) -> None:
        self.url, self.next = url, start
        self.accepted: dict[str, int] = {}
        self.answered_at: dict[str, float] = {}
        self.refused: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = request(
                    self.url + "/messages",
                    {"phone": phone(self.next), "message": f"private-text-{self.next}"},
                )
            except OSError:
                return  # the daemon died under us: what was not answered 202 was not accepted
            if status == 202:
                self.accepted[body["task_id"]] = self.next
                self.answered_at[body["task_id"]] = time.monotonic()
            else:
                self.refused.append(status)
            self.next += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def test_kill_9_mid_stream_loses_nothing_accepted(tmp_path: Path, fake_proc: FakeProcess) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = evolution_env(fake_proc)
    accepted: dict[str, int] = {}
    next_index = 0
    kills = 0
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    print(f"kill points seed {seed}")
    for _round in range(5):
        daemon = Daemon(data_dir, port, **env)
        stream = Stream(daemon.url, next_index)
        # A random moment: after 100 to 700 accepted messages, with sends in flight.
        target = rng.randrange(100, 700)
        wait_until(
            lambda s=stream, n=target: len(s.accepted) >= n, 60, f"{target} accepted messages"
        )
        daemon.proc.kill()  # SIGKILL: no drain, no cleanup
        daemon.proc.wait(10)
        daemon.log.close()
        kills += 1
        stream.stop()
        accepted.update(stream.accepted)
        # The POST cut by the kill may have been committed without its 202: never reuse its number
        # (a client that must retry such a POST uses an Idempotency-Key).
        next_index = stream.next + 1
    daemon = Daemon(data_dir, port, **env)
    try:

        def all_final() -> bool:
            rows = ledger_rows(data_dir)
            return all(rows.get(task_id, {}).get("status") in FINAL for task_id in accepted)

        wait_until(all_final, 120, "every accepted task to finish")
        rows = ledger_rows(data_dir)
        assert len(accepted) >= 500
        assert {rows[task_id]["status"] for task_id in accepted} == {"SUCCESS"}
        # Every accepted message reached Evolution; a duplicate only where a kill caught it mid-send.
        counts = Counter(r["number"] for r in fake_proc.received() if r["delivered"])
        for task_id, index in accepted.items():
            assert counts[phone(index).lstrip("+")] >= 1, task_id
        duplicated = {n for n, c in counts.items() if c > 1}
        assert len(duplicated) <= kills * 4  # at most the in-flight sends (4 workers) per kill
        flagged = {
            rows[t]["phone"] for t in accepted if rows[t]["recovered"] or rows[t]["ambiguous"]
        }
        assert duplicated <= flagged  # each duplicate is visible in the ledger
    finally:
        assert daemon.stop() == 0


def test_sigterm_drains_exits_0_and_the_rest_is_sent_after_restart(
    tmp_path: Path, fake_proc: FakeProcess
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {**evolution_env(fake_proc), "EVOMSGD_SEND_INTERVAL": "0.05", "EVOMSGD_SEND_JITTER": "0"}
    daemon = Daemon(data_dir, port, **env)
    stream = Stream(daemon.url, 0)
    wait_until(lambda: len(stream.accepted) >= 100, 60, "100 accepted")
    assert daemon.stop(signal.SIGTERM) == 0
    stream.stop()
    logs = daemon.logs()
    assert "draining" in logs and "drained" in logs
    # At INFO one line per delivered message, with its task id; acceptance is DEBUG.
    sent_lines = [line for line in logs.splitlines() if ": sent (attempt 1, " in line]
    assert sent_lines and ": accepted (" not in logs
    assert all(any(t in line for t in stream.accepted) for line in sent_lines)
    assert API_KEY not in logs and "private-text" not in logs  # no secrets, no message text
    rows = ledger_rows(data_dir)
    waiting = [t for t in stream.accepted if rows[t]["status"] in ("PENDING", "RETRY")]
    assert waiting, "pacing at 20/s should leave messages waiting at SIGTERM"
    assert all(
        rows[t]["status"] != "STARTED" for t in stream.accepted
    )  # nothing abandoned mid-send
    daemon = Daemon(data_dir, port, **env)
    try:
        wait_until(
            lambda: all(ledger_rows(data_dir)[t]["status"] == "SUCCESS" for t in stream.accepted),
            60,
            "all sent after restart",
        )
        assert sum(ledger_rows(data_dir)[t]["recovered"] for t in stream.accepted) == 0
    finally:
        assert daemon.stop() == 0


def test_a_second_sigterm_does_not_cancel_in_flight_sends(tmp_path: Path) -> None:
    fake = FakeProcess("--instances", "main", "--latency", "1.5")
    try:
        data_dir = tmp_path / "data"
        daemon = Daemon(data_dir, free_port(), **evolution_env(fake))
        status, body = request(daemon.url + "/messages", {"phone": phone(1), "message": "slow"})
        assert status == 202
        wait_until(lambda: fake.received(), 10, "the send to arrive at the fake")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in daemon.logs(), 10, "drain to start")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
        assert "already draining" in daemon.logs()
        row = ledger_rows(data_dir)[body["task_id"]]
        assert row["status"] == "SUCCESS" and row["recovered"] == 0
    finally:
        fake.stop()


def test_a_second_daemon_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Daemon(data_dir, free_port(), "--sandbox")
    try:
        second = serve_refused("--sandbox", "--data-dir", str(data_dir), "--port", str(free_port()))
        assert second.returncode == 2
        assert f"another evomsgd (pid {first.proc.pid}) is already serving" in second.stderr
    finally:
        assert first.stop() == 0


def test_data_dir_and_ledger_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, free_port(), "--sandbox")
    try:
        request(
            daemon.url + "/messages", {"phone": phone(2), "message": "hi", "instance_name": "x"}
        )
        assert (data_dir.stat().st_mode & 0o777) == 0o700
        for name in ("evomsgd.db", "evomsgd.db-wal"):
            assert ((data_dir / name).stat().st_mode & 0o777) == 0o600, name
        assert not (data_dir / "queue.db").exists()  # Huey's hand-off is in memory
    finally:
        daemon.stop()


def test_serve_without_evolution_settings_names_what_is_missing(tmp_path: Path) -> None:
    result = serve_refused("--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: EVOLUTION_API_URL and EVOLUTION_API_KEY are not set - export them (or put them in the env file) or "
        "pass --evolution-url/--evolution-key; use --sandbox to try evomsgd without an Evolution server"
    )
    assert os.listdir(tmp_path) == []
