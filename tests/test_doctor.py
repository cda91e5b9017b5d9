"""`evomsgd doctor` against real files and the fake Evolution process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.ledger.store import LEDGER_FILE, Store
from tests.conftest import API_KEY, FakeProcess, daemon_env, free_port
from tests.test_cli import run

SCHEMA = MIGRATIONS[-1][0]  # the newest migration the ledger was brought to

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProcess]:
    server = FakeProcess(
        "--instances",
        "main,other,pairing",
        "--state",
        "other=close",
        "--state",
        "pairing=connecting",
    )
    yield server
    server.stop()


def ledger(data_dir: Path, *instances: str) -> Path:
    data_dir.mkdir()
    store = Store(data_dir)
    for instance in instances:
        store.set_paused(instance, False, None, 0.0)  # a lanes row: an instance the ledger saw
    store.close()
    os.chmod(data_dir, 0o700)
    return data_dir


def lines(result: object) -> list[str]:
    return [line.rstrip() for line in result.stdout.splitlines()]  # type: ignore[attr-defined]


def test_sandbox_skips_evolution_and_exits_0(tmp_path: Path) -> None:
    data_dir = ledger(tmp_path / "data")
    result = run("doctor", "--sandbox", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result)
    assert out[0] == "OK    config           valid (no config file; sandbox mode)"
    assert out[1] == f"OK    data dir         {data_dir} (mode 0700, writable)"
    assert out[2].startswith(
        f"OK    ledger           quick_check ok; schema {SCHEMA}; 0 messages; "
    )
    assert out[3:] == [
        "SKIP  evolution        sandbox mode: nothing is sent to Evolution",
        "SKIP  api key          sandbox mode: nothing is sent to Evolution",
        "SKIP  instances        sandbox mode: nothing is sent to Evolution",
    ]


def test_every_instance_is_checked_and_a_closed_one_fails(
    tmp_path: Path, fake: FakeProcess
) -> None:
    data_dir = ledger(tmp_path / "data", "other", "pairing", "ghost")
    env = daemon_env(
        EVOLUTION_API_URL=fake.url, EVOLUTION_API_KEY=API_KEY, EVOLUTION_INSTANCE_NAME="main"
    )
    result = run("doctor", "--full", "--data-dir", str(data_dir), env=env)
    assert result.returncode == 1
    out = lines(result)
    assert out[0] == f"OK    config           valid (no config file; Evolution at {fake.url})"
    assert out[2].startswith(f"OK    ledger           integrity_check ok; schema {SCHEMA};")
    assert out[3:] == [
        f"OK    evolution        Evolution 2.3.7 is reachable at {fake.url}",
        "OK    api key          accepted (connectionState main: HTTP 200)",
        "OK    instance main    open (connected to WhatsApp)",
        "FAIL  instance ghost   Evolution has no instance 'ghost' - create it, or fix "
        "EVOLUTION_INSTANCE_NAME or the clients' instance_name",
        "FAIL  instance other   close: not connected to WhatsApp - pair it: scan the QR code in "
        "Evolution's manager",
        "WARN  instance pairing connecting - wait a minute; if it stays so, pair it again in "
        "Evolution's manager",
    ]
    assert API_KEY not in result.stdout


def test_a_rejected_key_fails_and_is_never_printed(tmp_path: Path, fake: FakeProcess) -> None:
    data_dir = ledger(tmp_path / "data")
    env = daemon_env(
        EVOLUTION_API_URL=fake.url,
        EVOLUTION_API_KEY="wrong-key-7a1c",
        EVOLUTION_INSTANCE_NAME="main",
    )
    result = run("doctor", "--data-dir", str(data_dir), env=env)
    assert result.returncode == 1
    assert lines(result)[4:] == [
        "FAIL  api key          Evolution rejected EVOLUTION_API_KEY (401) asking about main - "
        "set the server's global key (AUTHENTICATION_API_KEY) or the instance's token",
        "SKIP  instances        the API key was rejected",
    ]
    assert "wrong-key-7a1c" not in result.stdout + result.stderr


def test_unreachable_evolution_and_open_permissions(tmp_path: Path) -> None:
    data_dir = ledger(tmp_path / "data")
    os.chmod(data_dir, 0o755)
    url = f"http://127.0.0.1:{free_port()}"
    env = daemon_env(
        EVOLUTION_API_URL=url, EVOLUTION_API_KEY=API_KEY, EVOLUTION_INSTANCE_NAME="main"
    )
    result = run("doctor", "--data-dir", str(data_dir), env=env)
    assert result.returncode == 1
    out = lines(result)
    assert out[1] == (
        f"WARN  data dir         {data_dir} is open to other users (mode 0755); the ledger holds "
        f"message texts - chmod 700 {data_dir}"
    )
    assert out[3].startswith("FAIL  evolution        ")
    assert out[3].endswith(f" - check EVOLUTION_API_URL ({url}) and that Evolution runs")
    assert out[4:] == [
        "SKIP  api key          Evolution is not reachable",
        "SKIP  instances        Evolution is not reachable",
    ]


def test_a_damaged_ledger_fails(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / LEDGER_FILE).write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    result = run("doctor", "--sandbox", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert lines(result)[2].startswith(
        f"FAIL  ledger           cannot read {data_dir / LEDGER_FILE}: "
    )


def test_missing_settings_fail_with_the_fix(tmp_path: Path) -> None:
    result = run("doctor", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert lines(result)[0] == (
        "FAIL  config           EVOLUTION_API_URL and EVOLUTION_API_KEY are not set - export them "
        "(or put them in the env file) or pass --evolution-url/--evolution-key; use --sandbox "
        "to try evomsgd without an Evolution server"
    )
