"""`evomsgd doctor` against real files and a real fake Evolution: in-process with CliRunner and
exact lines, and once end-to-end against the fake run as its own process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import Result

from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.ledger.store import LEDGER_FILE, Store
from tests.conftest import API_KEY, FakeProcess, daemon_env, free_port
from tests.fake_evolution import FakeEvolution
from tests.test_cli import LoopThread, invoke, loop_thread, run

SCHEMA = MIGRATIONS[-1][0]  # the newest migration the ledger was brought to
__all__ = ["loop_thread"]  # a fixture, used by name

NOTHING_ANSWERS = "not checked: nothing answers at EVOLUTION_API_URL"
NOT_EVOLUTION = "not checked: the server at EVOLUTION_API_URL answers, but not as Evolution API"
NO_INSTANCE = "no instance to ask: none configured or in the ledger - set EVOLUTION_INSTANCE_NAME"


@pytest.fixture(scope="module")
def fake_process() -> Iterator[FakeProcess]:
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


@pytest.fixture
def fake(loop_thread: LoopThread) -> Iterator[FakeEvolution]:
    """The fake Evolution in this process, on the loop thread: doctor runs its own event loop."""
    server = FakeEvolution(api_key=API_KEY, instances=["main", "other", "pairing"])
    server.set_state("other", "close")
    server.set_state("pairing", "connecting")
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.close())


def doctor(data_dir: Path, *args: str, **env: str) -> Result:
    return invoke("doctor", "--data-dir", str(data_dir), *args, **env)


def evolution_failed(detail: str, why: str) -> list[str]:
    """The last three lines when the evolution check fails: it, and the two it stops."""
    return [
        f"FAIL  evolution        {detail}",
        f"SKIP  api key          {why}",
        f"SKIP  instances        {why}",
    ]


def evolution_env(url: str, key: str = API_KEY, instance: str = "main") -> dict[str, str]:
    return {"EVOLUTION_API_URL": url, "EVOLUTION_API_KEY": key, "EVOLUTION_INSTANCE_NAME": instance}


def test_sandbox_skips_evolution_and_exits_0(tmp_path: Path) -> None:
    data_dir = ledger(tmp_path / "data")
    result = doctor(data_dir, "--sandbox")
    assert result.exit_code == 0, result.output
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


@pytest.mark.slow
def test_every_instance_is_checked_and_a_closed_one_fails(
    tmp_path: Path, fake_process: FakeProcess
) -> None:
    fake = fake_process
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
        "WARN  receipts main    not configured: no delivery receipts - run "
        "`evomsgd webhook setup --instance main`",
        "WARN  receipts ghost   cannot read its webhook: Evolution has no such instance (404) - "
        "check the instance name",
        "WARN  receipts other   not configured: no delivery receipts - run "
        "`evomsgd webhook setup --instance other`",
        "WARN  receipts pairing not configured: no delivery receipts - run "
        "`evomsgd webhook setup --instance pairing`",
    ]
    assert API_KEY not in result.stdout


def test_a_rejected_key_fails_and_is_never_printed(tmp_path: Path, fake: FakeEvolution) -> None:
    data_dir = ledger(tmp_path / "data")
    result = doctor(data_dir, **evolution_env(fake.url, key="wrong-key-7a1c"))
    assert result.exit_code == 1
    assert lines(result)[3:] == [
        f"OK    evolution        Evolution 2.3.7 is reachable at {fake.url}",
        "FAIL  api key          Evolution rejected EVOLUTION_API_KEY (401) asking about main - "
        "set the server's global key (AUTHENTICATION_API_KEY) or the instance's token",
        "SKIP  instances        the API key was rejected",
    ]
    assert "wrong-key-7a1c" not in result.output


def test_refused_connection_says_so_once_with_one_fix_and_open_permissions(tmp_path: Path) -> None:
    data_dir = ledger(tmp_path / "data")
    os.chmod(data_dir, 0o755)
    url = f"http://127.0.0.1:{free_port()}"
    result = doctor(data_dir, **evolution_env(url))
    assert result.exit_code == 1
    out = lines(result)
    assert out[1] == (
        f"WARN  data dir         {data_dir} is open to other users (mode 0755); the ledger holds "
        f"message texts - chmod 700 {data_dir}"
    )
    refused = f"cannot connect to Evolution at {url} - is it running? check EVOLUTION_API_URL"
    assert out[3:] == evolution_failed(refused, NOTHING_ANSWERS)
    assert API_KEY not in result.output
    as_json = json.loads(doctor(data_dir, "--json", **evolution_env(url)).stdout)
    assert as_json[3:] == [
        {"check": "evolution", "verdict": "FAIL", "detail": refused},
        {"check": "api key", "verdict": "SKIP", "detail": NOTHING_ANSWERS},
        {"check": "instances", "verdict": "SKIP", "detail": NOTHING_ANSWERS},
    ]


def test_a_wrong_path_is_not_called_unreachable(tmp_path: Path, fake: FakeEvolution) -> None:
    data_dir = ledger(tmp_path / "data")
    url = fake.url + "/evolution"  # Evolution answers at its root, not under a path
    result = doctor(data_dir, **evolution_env(url))
    assert result.exit_code == 1
    assert lines(result)[3:] == evolution_failed(
        f"Evolution has no such route (404) at {url} - check EVOLUTION_API_URL", NOT_EVOLUTION
    )
    assert API_KEY not in result.output


def test_a_server_that_is_not_evolution(tmp_path: Path, loop_thread: LoopThread) -> None:
    async def welcome(request: web.Request) -> web.Response:
        if request.path != "/":
            raise web.HTTPNotFound(text="<html><body>404 Not Found</body></html>")
        return web.Response(
            text="<html><body>Welcome to nginx!</body></html>", content_type="text/html"
        )

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", welcome)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = loop_thread.run(start())
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        data_dir = ledger(tmp_path / "data")
        result = doctor(data_dir, **evolution_env(url))
    finally:
        loop_thread.run(runner.cleanup())
    assert result.exit_code == 1
    assert lines(result)[3:] == evolution_failed(
        f"the server at {url} does not answer like Evolution API - check the URL", NOT_EVOLUTION
    )


def test_without_an_instance_the_key_is_not_checked(tmp_path: Path, fake: FakeEvolution) -> None:
    data_dir = ledger(tmp_path / "data")
    answered = doctor(data_dir, **evolution_env(fake.url, instance=""))
    assert lines(answered)[3:] == [
        f"OK    evolution        Evolution 2.3.7 is reachable at {fake.url}",
        f"SKIP  api key          {NO_INSTANCE}",
        f"SKIP  instances        {NO_INSTANCE}",
    ]
    # Nothing to probe: whether anything listens is unknown, so the lines name what is missing.
    url = f"http://127.0.0.1:{free_port()}"
    refused = doctor(data_dir, **evolution_env(url, instance=""))
    assert lines(refused)[3:] == evolution_failed(
        f"cannot connect to Evolution at {url} - is it running? check EVOLUTION_API_URL",
        NO_INSTANCE,
    )


def test_a_version_mismatch_warns_with_the_setting_to_change(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    server = FakeEvolution(api_key=API_KEY, instances=["main"], api_version=1)
    loop_thread.run(server.start())
    try:
        result = doctor(ledger(tmp_path / "data"), **evolution_env(server.url))
    finally:
        loop_thread.run(server.close())
    assert result.exit_code == 0, result.output
    assert lines(result)[3:] == [
        f"WARN  evolution        Evolution 1.8.2 answers at {server.url}, but "
        "EVOMSGD_EVOLUTION_API_VERSION is 2 - set it to 1",
        "OK    api key          accepted (connectionState main: HTTP 200)",
        "OK    instance main    open (connected to WhatsApp)",
        "WARN  receipts main    not configured: no delivery receipts - run "
        "`evomsgd webhook setup --instance main`",
    ]


def test_a_damaged_ledger_fails(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / LEDGER_FILE).write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    result = doctor(data_dir, "--sandbox")
    assert result.exit_code == 1
    assert lines(result)[2].startswith(
        f"FAIL  ledger           cannot read {data_dir / LEDGER_FILE}: "
    )


def test_missing_settings_fail_with_the_fix(tmp_path: Path) -> None:
    result = doctor(tmp_path)
    assert result.exit_code == 1
    assert lines(result)[0] == (
        "FAIL  config           EVOLUTION_API_URL and EVOLUTION_API_KEY are not set - export them "
        "(or put them in the env file) or pass --evolution-url/--evolution-key; use --sandbox "
        "to try evomsgd without an Evolution server"
    )
