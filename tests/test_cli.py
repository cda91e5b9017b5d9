"""The `evomsgd` command against a real sandbox daemon, and offline against the SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from evomsgd import __version__
from tests.conftest import ROOT, daemon_env, free_port, wait_until
from tests.test_e2e import Daemon

pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evomsgd", *args],
        cwd=ROOT,
        env=env or daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    daemon = Daemon(
        data_dir, free_port(), "--sandbox", "--instance", "shop", EVOMSGD_SEND_INTERVAL="0"
    )
    yield daemon
    daemon.stop()


def cli_env(daemon: Daemon) -> dict[str, str]:
    return daemon_env(EVOMSGD_PORT=str(daemon.port), EVOMSGD_DATA_DIR=str(daemon.data_dir))


def test_version_from_both_entry_points() -> None:
    assert run("--version").stdout.strip() == f"evomsgd, version {__version__}"
    console = subprocess.run(
        [str(Path(sys.executable).with_name("evomsgd")), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert console.stdout.strip() == f"evomsgd, version {__version__}"


def test_send_then_show_reaches_success_in_sandbox(sandbox: Daemon) -> None:
    env = cli_env(sandbox)
    sent = run("send", "--phone", "+5215512345678", "--message", "Hola Carlos", env=env)
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    assert len(task_id) == 36

    def shown() -> dict[str, object] | None:
        data = json.loads(run("tasks", "show", task_id, "--json", env=env).stdout)
        return data if data["status"] == "SUCCESS" else None

    task = wait_until(shown, 10, "task SUCCESS")
    assert task["instance"] == "shop" and task["sandbox"] is True
    human = run("tasks", "show", task_id, env=env).stdout
    assert task_id in human and "SUCCESS" in human and "attempt sent" in human
    listing = run("tasks", "list", "--status", "SUCCESS", env=env).stdout
    assert task_id in listing


def test_send_reports_validation_errors(sandbox: Daemon) -> None:
    result = run("send", "--phone", "12", "--message", "x", env=cli_env(sandbox))
    assert result.returncode == 1
    assert result.stderr.startswith("error: 422 validation_error: phone:")


def test_status_of_a_running_daemon(sandbox: Daemon) -> None:
    result = run("status", env=cli_env(sandbox))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("evomsgd is UP (ok)")
    assert "SANDBOX MODE" in result.stdout
    assert "\x1b[" not in result.stdout  # no colours when piped
    data = json.loads(run("status", "--json", env=cli_env(sandbox)).stdout)
    assert data["daemon"] == "up" and data["status"] == "ok" and data["sandbox"] is True


def test_status_reads_the_ledger_when_the_daemon_is_down(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, free_port(), "--sandbox", "--instance", "shop")
    env = cli_env(daemon)
    subprocess.run(
        [sys.executable, "-m", "evomsgd", "pause", "shop"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=30,
    )
    run("send", "--phone", "+5215512345678", "--message", "waits", env=env)
    assert daemon.stop() == 0
    result = run("status", env=env)
    assert result.returncode == 2
    assert result.stdout.startswith("evomsgd is DOWN (down)")
    assert "  mode       sandbox" in result.stdout.splitlines()
    assert (
        "PENDING 1" in result.stdout
        and "instance shop" in result.stdout
        and "paused" in result.stdout
    )
    data = json.loads(run("status", "--json", env=env).stdout)
    assert data["daemon"] == "down" and data["counts"]["PENDING"] == 1
    assert data["instances"][0]["state"] == "paused"


def test_cancel_retry_pause_resume(sandbox: Daemon) -> None:
    env = cli_env(sandbox)
    assert run("pause", "shop", env=env).stdout.strip() == "shop paused"
    task_id = run("send", "--phone", "+5215512345678", "--message", "later", env=env).stdout.strip()
    assert run("cancel", task_id, env=env).stdout.strip() == f"{task_id} CANCELED"
    again = run("cancel", task_id, env=env)
    assert again.returncode == 1 and "409 too_late" in again.stderr
    assert run("retry", task_id, env=env).stdout.strip() == f"{task_id} PENDING"
    assert run("resume", "shop", env=env).stdout.strip() == "shop resumed"
    wait_until(
        lambda: (
            json.loads(run("tasks", "show", task_id, "--json", env=env).stdout)["status"]
            == "SUCCESS"
        ),
        10,
        "retried task sent",
    )
    history = json.loads(run("tasks", "show", task_id, "--json", env=env).stdout)["history"]
    assert [h["event"] for h in history] == ["canceled", "requeued", "attempt"]


def test_bulk_retry_needs_filters() -> None:
    result = run("retry")
    assert result.returncode == 2
    assert "give a task id, or --status FAILURE" in result.stderr


def test_cli_without_a_daemon_says_how_to_fix_it(tmp_path: Path) -> None:
    result = run(
        "send",
        "--phone",
        "+5215512345678",
        "--message",
        "x",
        env=daemon_env(EVOMSGD_PORT=str(free_port())),
    )
    assert result.returncode == 2
    assert "is `evomsgd serve` running?" in result.stderr


def test_bulk_retry_requeues_failures_and_keeps_their_history(tmp_path: Path) -> None:
    from tests.conftest import API_KEY, FakeProcess

    fake = FakeProcess("--instances", "main", "--not-on-whatsapp", "5511988000001,5511988000002")
    daemon = Daemon(
        tmp_path / "data",
        free_port(),
        EVOLUTION_API_URL=fake.url,
        EVOLUTION_API_KEY=API_KEY,
        EVOLUTION_INSTANCE_NAME="main",
        EVOMSGD_SEND_INTERVAL="0",
    )
    try:
        env = cli_env(daemon)
        ids = [
            run("send", "--phone", f"+551198800000{i}", "--message", "x", env=env).stdout.strip()
            for i in (1, 2, 3)
        ]

        def status_of(task_id: str) -> str:
            return str(
                json.loads(run("tasks", "show", task_id, "--json", env=env).stdout)["status"]
            )

        wait_until(
            lambda: [status_of(t) for t in ids] == ["FAILURE", "FAILURE", "SUCCESS"],
            20,
            "2 failures",
        )
        result = run("retry", "--status", "FAILURE", "--since", "1h", "--instance", "main", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "requeued 2 task(s)"
        wait_until(lambda: all(status_of(t) == "FAILURE" for t in ids[:2]), 20, "failures again")
        history = json.loads(run("tasks", "show", ids[0], "--json", env=env).stdout)["history"]
        assert [h["event"] for h in history] == ["attempt", "requeued", "attempt"]
        assert "not on WhatsApp" in history[0]["detail"]
    finally:
        daemon.stop()
        fake.stop()


def run_on_tty(*args: str, env: dict[str, str]) -> str:
    """Run the CLI with stdout on a pseudo-terminal (as in an interactive shell); its output."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomsgd", *args],
        cwd=ROOT,
        env=env,
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    proc.wait(30)
    return b"".join(chunks).decode()


def test_status_colours_follow_the_terminal_flags_and_no_color(sandbox: Daemon) -> None:
    env = cli_env(sandbox)
    green_head = "\x1b[32m\x1b[1mevomsgd is UP (ok)\x1b[0m"
    assert run_on_tty("status", env=env).startswith(green_head)
    assert "\x1b[" not in run_on_tty("status", env={**env, "NO_COLOR": "1"})
    assert "\x1b[" not in run_on_tty("status", "--no-color", env=env)
    # Piped: plain unless forced; an explicit --color wins over NO_COLOR.
    assert "\x1b[" not in run("status", env=env).stdout
    assert run("status", "--color", env=env).stdout.startswith(green_head)
    assert run("status", "--color", env={**env, "NO_COLOR": "1"}).stdout.startswith(green_head)


def test_status_is_degraded_with_exit_code_1_when_evolution_rejects_the_key(
    tmp_path: Path,
) -> None:
    from tests.conftest import FakeProcess

    fake = FakeProcess("--instances", "main")
    daemon = Daemon(
        tmp_path / "data",
        free_port(),
        EVOLUTION_API_URL=fake.url,
        EVOLUTION_API_KEY="a-wrong-key-3e1d",
        EVOLUTION_INSTANCE_NAME="main",
        EVOMSGD_SEND_INTERVAL="0",
    )
    try:
        env = cli_env(daemon)
        task_id = run("send", "--phone", "+5511988000001", "--message", "x", env=env).stdout.strip()
        result = wait_until(
            lambda: (r := run("status", env=env)).returncode == 1 and r, 20, "degraded status"
        )
        lines = result.stdout.splitlines()
        assert lines[0] == "evomsgd is UP (degraded)"
        assert "  mode       live" in lines
        rejected = (
            "Evolution rejected the API key (401) - check EVOLUTION_API_KEY "
            "(Evolution said: Unauthorized)"
        )
        assert f"  instance main             config_error waiting 1 last error: {rejected}" in lines
        data = json.loads(run("status", "--json", env=env).stdout)
        assert data["status"] == "degraded"
        assert data["last_error"]["task_id"] == task_id
        at = data["last_error"]["at"]
        assert f"  last error {at} task {task_id} instance main: {rejected}" in lines
        assert f"  ! instance main is config_error: {rejected}" in lines
        assert "a-wrong-key-3e1d" not in result.stdout
    finally:
        daemon.stop()
        fake.stop()
