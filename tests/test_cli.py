"""The `evomsgd` command: in-process with click's CliRunner against the real app served on a
thread (exact output), and end-to-end as real processes against a real sandbox daemon."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from evomsgd import __version__, clock
from evomsgd.app import create_app
from evomsgd.cli.daemon_client import DaemonClient
from evomsgd.cli.main import cli
from evomsgd.cli.status import ago, render
from evomsgd.config import Settings
from evomsgd.ledger.store import LEDGER_FILE
from evomsgd.web.server import Runner, http_limits
from tests.conftest import API_KEY, ROOT, daemon_env, fast_settings, free_port, wait_until
from tests.fake_evolution import FakeEvolution
from tests.test_e2e import Daemon

T = TypeVar("T")


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


@pytest.mark.slow
def test_version_from_both_entry_points() -> None:
    assert run("--version").stdout.strip() == f"evomsgd, version {__version__}"
    console = subprocess.run(
        [str(Path(sys.executable).with_name("evomsgd")), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert console.stdout.strip() == f"evomsgd, version {__version__}"


@pytest.mark.slow
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


@pytest.mark.slow
def test_send_reports_validation_errors(sandbox: Daemon) -> None:
    result = run("send", "--phone", "12", "--message", "x", env=cli_env(sandbox))
    assert result.returncode == 1
    assert result.stderr.startswith("error: 422 validation_error: phone:")


@pytest.mark.slow
def test_status_of_a_running_daemon(sandbox: Daemon) -> None:
    result = run("status", env=cli_env(sandbox))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("evomsgd is UP (ok)")
    assert "SANDBOX MODE" in result.stdout
    assert "\x1b[" not in result.stdout  # no colours when piped
    data = json.loads(run("status", "--json", env=cli_env(sandbox)).stdout)
    assert data["daemon"] == "up" and data["status"] == "ok" and data["sandbox"] is True


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bulk_retry_needs_filters() -> None:
    result = run("retry")
    assert result.returncode == 2
    assert "give a task id, or --status FAILURE" in result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        # Degraded can show before the send's own failure is recorded (a probe may see the bad
        # key first): wait for both, the lane's state and the task's last error.
        result = wait_until(
            lambda: (
                (r := run("status", env=env)).returncode == 1
                and f"task {task_id}" in r.stdout
                and r
            ),
            20,
            "degraded status with the task's error",
        )
        lines = result.stdout.splitlines()
        assert lines[0] == "evomsgd is UP (degraded)"
        assert "  mode       live" in lines
        rejected = (
            "Evolution rejected the API key (401) - check EVOLUTION_API_KEY "
            "(Evolution said: Unauthorized)"
        )
        assert f"  instance main             config_error waiting 1 problem: {rejected}" in lines
        data = json.loads(run("status", "--json", env=env).stdout)
        assert data["status"] == "degraded"
        assert data["last_error"]["task_id"] == task_id
        at = data["last_error"]["at"]
        assert (
            f"  last error {at} (N s ago) task {task_id} instance main: {rejected}"
            in seconds_ago(result.stdout, 1).splitlines()
        )
        assert f"  ! instance main is config_error: {rejected}" in lines
        assert "a-wrong-key-3e1d" not in result.stdout
    finally:
        daemon.stop()
        fake.stop()


# --- in-process: CliRunner against the real app, exact output --------------------------------


class LoopThread:
    """An asyncio loop on its own thread: a server answers there while CliRunner blocks here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ServedApp:
    """The real app on a real ledger, listening on 127.0.0.1 with the daemon's own runner."""

    def __init__(self, loop: LoopThread, settings: Settings, data_dir: Path) -> None:
        self.loop, self.settings, self.data_dir = loop, settings, data_dir
        self._runner: Runner | None = None
        self.url = ""

    def start(self) -> None:
        async def start() -> Runner:
            runner = Runner(
                create_app(self.settings, self.data_dir),
                handle_signals=False,
                access_log=None,
                **http_limits(self.settings),
            )
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner

        self._runner = self.loop.run(start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def stop(self) -> None:
        if self._runner is not None:
            self.loop.run(self._runner.cleanup())
            self._runner = None

    @property
    def env(self) -> dict[str, str]:
        """What a shell beside this daemon would export for the CLI."""
        return {"EVOMSGD_URL": self.url, "EVOMSGD_DATA_DIR": str(self.data_dir)}

    def get(self, path: str, token: str | None = None) -> Any:
        reply = DaemonClient(self.url, token).request("GET", path)
        assert reply.status == 200, (path, reply)
        return reply.body

    def wait_status(self, task_id: str, status: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task: dict[str, Any] = self.get(f"/tasks/{task_id}")
            return task if task["status"] == status else None

        found: dict[str, Any] = wait_until(reached, 10, f"task {task_id} {status}")
        return found


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    # The token commands set umask 077 as the daemon does; in-process, that would outlive them.
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def app(loop_thread: LoopThread, tmp_path: Path) -> Iterator[ServedApp]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    served = ServedApp(loop_thread, fast_settings(sandbox=True, default_instance="shop"), data_dir)
    served.start()
    yield served
    served.stop()


def invoke(*args: str, **env: str) -> Result:
    """Run `evomsgd ARGS` in this process with only the given EVOMSGD_/EVOLUTION_ variables."""
    clean: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("EVOMSGD_", "EVOLUTION_"))
    }
    clean.update(env)
    return CliRunner(env=clean).invoke(cli, list(args), catch_exceptions=False)


def send(app: ServedApp, phone: str, *extra: str) -> str:
    result = invoke("send", "--phone", phone, "--message", "Hola Carlos", *extra, **app.env)
    assert result.exit_code == 0, result.output
    task_id = result.stdout.strip()
    assert result.stdout == task_id + "\n" and UUID.fullmatch(task_id), result.stdout
    return task_id


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
UNREACHABLE = (
    "no evomsgd answering at {url} ([Errno 111] Connection refused) - is `evomsgd serve` "
    "running? (set EVOMSGD_URL or --url if it listens elsewhere)"
)
COUNTS = "PENDING {}  STARTED 0  RETRY 0  SUCCESS {}  FAILURE 0  SCHEDULED 0  CANCELED 0  EXPIRED 0"


def seconds(text: str, label: str) -> str:
    """`text` with the one genuinely variable duration after `label` replaced by `Ns`."""
    normalised, count = re.subn(rf"^(  {label}\s+)\d+s$", r"\1Ns", text, flags=re.M)
    assert count == 1, f"no '{label} <seconds>' line in:\n{text}"
    return normalised


def test_status_of_a_running_daemon_is_printed_whole(app: ServedApp) -> None:
    assert invoke("pause", "shop", **app.env).exit_code == 0
    send(app, "+5215512345678")
    result = invoke("status", **app.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert seconds(seconds(result.stdout, "uptime"), "oldest waiting") == (
        "evomsgd is UP (ok)\n"
        "SANDBOX MODE: messages are recorded, never sent\n"
        f"  version    {__version__}\n"
        "  uptime     Ns\n"
        f"  url        {app.url}\n"
        "  mode       sandbox\n"
        f"  data dir   {app.data_dir}\n"
        "  workers    2/2 alive\n"
        f"  messages   {COUNTS.format(1, 0)}\n"
        "  oldest waiting Ns\n"
        "  instance shop             paused       waiting 1 problem: paused by an operator\n"
        "  ! SANDBOX MODE: messages are recorded, never sent to Evolution\n"
    )
    data = json.loads(invoke("status", "--json", **app.env).stdout)
    assert (data["daemon"], data["status"], data["url"]) == ("up", "ok", app.url)
    assert data["counts"]["PENDING"] == 1


def test_status_reads_the_ledger_when_nothing_answers(app: ServedApp) -> None:
    assert invoke("pause", "shop", **app.env).exit_code == 0
    send(app, "+5215512345678")
    app.stop()
    result = invoke("status", **app.env)
    assert (result.exit_code, result.stderr) == (2, ""), result.output
    assert seconds(result.stdout, "oldest waiting") == (
        "evomsgd is DOWN (down)\n"
        "SANDBOX MODE: messages are recorded, never sent\n"
        f"  version    {__version__}\n"
        "  mode       sandbox\n"
        f"  data dir   {app.data_dir}\n"
        f"  messages   {COUNTS.format(1, 0)}\n"
        "  oldest waiting Ns\n"
        "  instance shop             paused       waiting 1\n"
        f"  ! {UNREACHABLE.format(url=app.url)}\n"
    )


@pytest.fixture
def evolution(loop_thread: LoopThread) -> Iterator[FakeEvolution]:
    fake = FakeEvolution(api_key=API_KEY, instances=["main"])
    loop_thread.run(fake.start())
    yield fake
    loop_thread.run(fake.close())


@pytest.fixture
def live(loop_thread: LoopThread, evolution: FakeEvolution, tmp_path: Path) -> Iterator[ServedApp]:
    """The real app sending to the fake Evolution server; an open lane probes once a minute."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    # The slow probe of an open lane lets a send, not a probe, be what finds it closed.
    settings = fast_settings(evolution_url=evolution.url, probe_interval=60)
    served = ServedApp(loop_thread, settings, data_dir)
    served.start()
    yield served
    served.stop()


def lane(app: ServedApp, instance: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        lane for lane in app.get("/instances")["instances"] if lane["instance"] == instance
    )
    return found


CLOSED = (
    "the instance is not connected to WhatsApp (500) - pair it with the QR code in Evolution "
    "(Evolution said: Cannot read properties of undefined (reading 'onWhatsApp'))"
)


PROBED_CLOSED = "instance main is not connected to WhatsApp - pair it in Evolution"


def close_lane(app: ServedApp, evolution: FakeEvolution) -> tuple[str, str]:
    """Send once to an open lane, then once while its instance is closed: (sent, retrying) ids.

    The failed send pauses the lane; it waits until the pause's probe has said why.
    """
    sent = send(app, "+5511988000001")
    app.wait_status(sent, "SUCCESS")
    evolution.set_state("main", "close")
    retrying = send(app, "+5511988000002")
    app.wait_status(retrying, "RETRY")
    wait_until(lambda: lane(app, "main")["problem"] == PROBED_CLOSED, 10, "the probe's reason")
    return sent, retrying


def seconds_ago(text: str, count: int) -> str:
    """`text` with its `count` relative times of a few seconds ('3 s ago') as 'N s ago'."""
    normalised, found = re.subn(r"\b\d+ s ago\b", "N s ago", text)
    assert found == count, f"{found} '<n> s ago' in:\n{text}"
    return normalised


def test_status_shows_what_stops_a_lane_while_it_lasts(
    live: ServedApp, evolution: FakeEvolution
) -> None:
    _, task_id = close_lane(live, evolution)
    result = invoke("status", **live.env)
    assert (result.exit_code, result.stderr) == (1, ""), result.output
    at = json.loads(invoke("status", "--json", **live.env).stdout)["last_error"]["at"]
    text = seconds_ago(seconds(seconds(result.stdout, "uptime"), "oldest waiting"), 1)
    assert text == (
        "evomsgd is UP (degraded)\n"
        f"  version    {__version__}\n"
        "  uptime     Ns\n"
        f"  url        {live.url}\n"
        "  mode       live\n"
        f"  data dir   {live.data_dir}\n"
        f"  evolution  {live.settings.evolution_url}\n"
        "  workers    2/2 alive\n"
        "  messages   PENDING 0  STARTED 0  RETRY 1  SUCCESS 1  FAILURE 0  SCHEDULED 0  "
        "CANCELED 0  EXPIRED 0\n"
        "  oldest waiting Ns\n"
        f"  instance main             close        waiting 1 problem: {PROBED_CLOSED}\n"
        f"  last error {at} (N s ago) task {task_id} instance main: {CLOSED}\n"
        f"  ! instance main is close: {PROBED_CLOSED}\n"
    )


def test_status_shows_a_recovered_lanes_error_as_history(
    live: ServedApp, evolution: FakeEvolution
) -> None:
    _, task_id = close_lane(live, evolution)
    evolution.set_state("main", "open")
    live.wait_status(task_id, "SUCCESS")
    result = invoke("status", **live.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    at = json.loads(invoke("status", "--json", **live.env).stdout)["last_error"]["at"]
    assert seconds_ago(seconds(result.stdout, "uptime"), 3) == (
        "evomsgd is UP (ok)\n"
        f"  version    {__version__}\n"
        "  uptime     Ns\n"
        f"  url        {live.url}\n"
        "  mode       live\n"
        f"  data dir   {live.data_dir}\n"
        f"  evolution  {live.settings.evolution_url}\n"
        "  workers    2/2 alive\n"
        "  messages   PENDING 0  STARTED 0  RETRY 0  SUCCESS 2  FAILURE 0  SCHEDULED 0  "
        "CANCELED 0  EXPIRED 0\n"
        "  oldest waiting -\n"
        f"  instance main             idle         waiting 0 last error N s ago ({PROBED_CLOSED}),"
        " recovered N s ago\n"
        f"  last error {at} (N s ago) task {task_id} instance main: {CLOSED}\n"
    )


def test_render_dates_a_lanes_error_and_recovery_from_now() -> None:
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC).timestamp()
    recovered = {
        "instance": "main",
        "state": "idle",
        "waiting": 0,
        "problem": None,
        "last_error": "Evolution did not answer",
        "last_error_at": "2026-05-04T11:48:00.000Z",
        "recovered_at": "2026-05-04T11:48:30.500Z",
    }
    failing = {**recovered, "instance": "spare", "recovered_at": None}
    report = {"daemon": "up", "status": "ok", "instances": [recovered, failing]}
    assert render(report, color=False, now=now).splitlines()[1:] == [
        "  instance main             idle         waiting 0 last error 12 min ago "
        "(Evolution did not answer), recovered 11 min ago",
        "  instance spare            idle         waiting 0 last error 12 min ago "
        "(Evolution did not answer)",
    ]


@pytest.mark.parametrize(
    ("before", "said"),
    [
        (-5, "0 s ago"),  # a clock a little ahead of ours
        (0, "0 s ago"),
        (59.9, "59 s ago"),
        (60, "1 min ago"),
        (3599, "59 min ago"),
        (3600, "1 h ago"),
        (86_399, "23 h ago"),
        (86_400, "1 day ago"),
        (3 * 86_400 + 5, "3 days ago"),
    ],
)
def test_ago_says_how_long_before_now_in_one_coarse_unit(before: float, said: str) -> None:
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC).timestamp()
    assert ago(clock.to_rfc3339(now - before), now) == said


def test_every_daemon_command_says_how_to_fix_an_unreachable_daemon(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    task_id = "01a21fde-0dd2-726f-825e-65960dff246d"
    for args in (
        ("send", "--phone", "+5215512345678", "--message", "x"),
        ("tasks", "show", task_id),
        ("tasks", "list"),
        ("cancel", task_id),
        ("retry", task_id),
        ("retry", "--status", "FAILURE"),
        ("pause", "shop"),
        ("resume", "shop"),
    ):
        result = invoke(*args, "--url", url)
        assert (result.exit_code, result.stdout) == (2, ""), args
        assert result.stderr == f"error: {UNREACHABLE.format(url=url)}\n", args


def test_send_prints_the_task_id_and_queues_what_it_was_given(app: ServedApp) -> None:
    task_id = send(app, "+5215512345678", "--priority", "high", "--instance", "shop")
    task = app.wait_status(task_id, "SUCCESS")
    assert (task["phone"], task["phone_input"]) == ("525512345678", "+5215512345678")
    assert (task["instance"], task["priority"]) == ("shop", "high")
    # The same idempotency key and body queue once: the first id comes back.
    first = send(app, "+5215512345678", "--idempotency-key", "order-1042")
    assert send(app, "+5215512345678", "--idempotency-key", "order-1042") == first


def test_send_reports_the_daemons_validation_error_exactly(app: ServedApp) -> None:
    result = invoke("send", "--phone", "12", "--message", "x", **app.env)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        "error: 422 validation_error: phone: '12' is too short to be a phone number - send it in "
        "international format, e.g. +5215512345678\n"
    )


def test_tasks_show_prints_the_task_and_its_history(app: ServedApp) -> None:
    task_id = send(app, "+5215512345678")
    task = app.wait_status(task_id, "SUCCESS")
    result = invoke("tasks", "show", task_id, **app.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    [attempt] = task["history"]
    assert result.stdout == (
        f"{task_id}  SUCCESS  instance shop  phone 525512345678\n"
        f"  created {task['created_at']}  attempts 1  expires {task['expires_at']}\n"
        f"  evolution key {task['result']['evolution_key']}  jid 525512345678@s.whatsapp.net\n"
        f"  {attempt['at']}  attempt sent\n"
    )
    as_json = invoke("tasks", "show", task_id, "--json", **app.env)
    assert json.loads(as_json.stdout) == task


def test_tasks_show_of_an_unknown_id_fails_with_the_daemons_message(app: ServedApp) -> None:
    task_id = "01a21fde-0dd2-726f-825e-65960dff246d"
    result = invoke("tasks", "show", task_id, **app.env)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: 404 not_found: no task with id '{task_id}' - check the task_id returned by "
        "POST /messages\n"
    )


def test_tasks_list_shows_long_and_group_jids_whole(app: ServedApp) -> None:
    assert invoke("pause", "shop", **app.env).exit_code == 0
    phones = ["+5215512345678", "120363025246125486@g.us", "5215512345678@s.whatsapp.net"]
    ids = [send(app, phone) for phone in phones]
    created = [app.get(f"/tasks/{task_id}")["created_at"] for task_id in ids]
    result = invoke("tasks", "list", **app.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    # Newest first; the PHONE column is as wide as the longest JID, nothing is cut.
    assert result.stdout == (
        "TASK ID                               STATUS     INSTANCE        PHONE"
        "                         CREATED\n"
        f"{ids[2]}  PENDING    shop            5215512345678@s.whatsapp.net  {created[2]}\n"
        f"{ids[1]}  PENDING    shop            120363025246125486@g.us       {created[1]}\n"
        f"{ids[0]}  PENDING    shop            525512345678                  {created[0]}\n"
    )
    # What the table shows is what --phone takes.
    group = invoke("tasks", "list", "--phone", "120363025246125486@g.us", **app.env)
    assert group.stdout.splitlines()[1:] == [
        f"{ids[1]}  PENDING    shop            120363025246125486@g.us  {created[1]}"
    ]
    listed = json.loads(invoke("tasks", "list", "--json", **app.env).stdout)
    assert [t["task_id"] for t in listed["tasks"]] == ids[::-1]


def test_tasks_list_keeps_the_columns_of_short_values_and_says_when_empty(app: ServedApp) -> None:
    empty = invoke("tasks", "list", **app.env)
    assert (empty.exit_code, empty.stdout) == (0, "no tasks\n")
    instance = "a-very-long-instance-name"
    assert invoke("pause", instance, **app.env).exit_code == 0  # so that it stays PENDING
    task_id = send(app, "+5511988887777", "--instance", instance)
    created = app.get(f"/tasks/{task_id}")["created_at"]
    assert invoke("tasks", "list", **app.env).stdout == (
        "TASK ID                               STATUS     INSTANCE                   PHONE"
        "             CREATED\n"
        f"{task_id}  PENDING    a-very-long-instance-name  5511988887777     {created}\n"
    )


def test_cancel_retry_pause_resume_in_process(app: ServedApp) -> None:
    assert invoke("pause", "shop", **app.env).stdout == "shop paused\n"
    [lane] = [i for i in app.get("/instances")["instances"] if i["instance"] == "shop"]
    assert lane["state"] == "paused"
    task_id = send(app, "+5215512345678")
    assert invoke("cancel", task_id, **app.env).stdout == f"{task_id} CANCELED\n"
    again = invoke("cancel", task_id, **app.env)
    assert (again.exit_code, again.stdout) == (1, "")
    assert again.stderr == (
        f"error: 409 too_late: task {task_id} is CANCELED; only a message that waits "
        "(PENDING, SCHEDULED, RETRY) can be canceled\n"
    )
    assert invoke("retry", task_id, **app.env).stdout == f"{task_id} PENDING\n"
    assert invoke("resume", "shop", **app.env).stdout == "shop resumed\n"
    task = app.wait_status(task_id, "SUCCESS")
    assert [h["event"] for h in task["history"]] == ["canceled", "requeued", "attempt"]


def test_bulk_retry_requeues_every_match_and_refuses_mixed_arguments(app: ServedApp) -> None:
    assert invoke("pause", "shop", **app.env).exit_code == 0
    ids = [send(app, f"+551198800000{i}") for i in (1, 2)]
    for task_id in ids:
        assert invoke("cancel", task_id, **app.env).exit_code == 0
    result = invoke("retry", "--status", "CANCELED", "--instance", "shop", **app.env)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "requeued 2 task(s)\n", "")
    assert [app.get(f"/tasks/{t}")["status"] for t in ids] == ["PENDING", "PENDING"]
    nothing = invoke("retry", "--status", "CANCELED", **app.env)
    assert (nothing.exit_code, nothing.stdout) == (0, "requeued 0 task(s)\n")
    both = invoke("retry", ids[0], "--status", "FAILURE", **app.env)
    assert (both.exit_code, both.stdout) == (2, "")
    assert both.stderr == (
        "error: give a task id or bulk filters (--status/--since/--instance), not both\n"
    )
    neither = invoke("retry", **app.env)
    assert (neither.exit_code, neither.stdout) == (2, "")
    assert neither.stderr == (
        "error: give a task id, or --status FAILURE (with --since/--instance) for a bulk retry\n"
    )


def test_tokens_created_listed_and_revoked_take_effect_on_a_running_daemon(
    app: ServedApp,
) -> None:
    none = invoke("token", "list", **app.env)
    assert none.stdout == "no tokens: the API answers without authentication (on loopback only)\n"
    made = invoke("token", "create", "shop-backend", "--instance", "shop", **app.env)
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n" and re.fullmatch(r"evm_[\w-]{43}", secret), made.stdout
    assert made.stderr == (
        "token 'shop-backend' created for shop. Store it now: it cannot be shown again.\n"
    )
    ops = invoke("token", "create", "ops", **app.env)
    assert ops.stderr == (
        "token 'ops' created for every instance. Store it now: it cannot be shown again.\n"
    )
    rows = json.loads(invoke("token", "list", "--json", **app.env).stdout)
    assert [(r["name"], r["instances"]) for r in rows] == [("ops", []), ("shop-backend", ["shop"])]
    listing = invoke("token", "list", **app.env).stdout
    assert listing == (
        f"ops                      *                        {rows[0]['created_at']}\n"
        f"shop-backend             shop                     {rows[1]['created_at']}\n"
    )
    assert secret not in listing and ops.stdout.strip() not in listing

    # The daemon picks tokens up from the ledger without a restart.
    def status_without_token() -> int:
        return DaemonClient(app.url).request("GET", "/tasks").status

    wait_until(lambda: status_without_token() == 401, 10, "the daemon to require a token")
    refused = invoke("tasks", "list", **app.env)
    assert (refused.exit_code, refused.stdout) == (1, "")
    assert refused.stderr.startswith("error: 401 unauthorized: ")
    assert invoke("tasks", "list", "--token", secret, **app.env).stdout == "no tasks\n"

    assert invoke("token", "revoke", "shop-backend", **app.env).stdout == (
        "token 'shop-backend' revoked\n"
    )
    wait_until(
        lambda: DaemonClient(app.url, secret).request("GET", "/tasks").status == 401,
        10,
        "the revoked token to be refused",
    )
    gone = invoke("token", "revoke", "shop-backend", **app.env)
    assert (gone.exit_code, gone.stdout) == (1, "")
    assert gone.stderr == "error: no token named 'shop-backend' - see `evomsgd token list`\n"


def test_purge_dry_run_counts_and_changes_nothing(app: ServedApp) -> None:
    task_id = send(app, "+5215512345678")
    app.wait_status(task_id, "SUCCESS")
    app.stop()
    # Age the message as 40 days would: the retention rules read finished_at.
    old = clock.to_db(clock.now() - 40 * 86_400)
    with sqlite3.connect(app.data_dir / LEDGER_FILE) as conn:
        conn.execute("UPDATE messages SET finished_at = ? WHERE id = ?", (old, task_id))
    conn.close()
    result = invoke("purge", "--dry-run", **app.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    # The file's size is the one figure that depends on SQLite's page layout, not on evomsgd.
    out = re.sub(r"\(ledger \d+\.\d MB\)", "(ledger N MB)", result.stdout)
    assert out == (
        "would remove 1 SUCCESS messages finished over 30 days ago\n"
        "would remove 0 FAILURE/EXPIRED/CANCELED messages finished over 90 days ago\n"
        "would remove 1 history events of those messages\n"
        "kept every message text (EVOMSGD_ERASE_TEXT_DAYS is not set)\n"
        "would remove 0 expired idempotency keys\n"
        "would remove 0 media files no message uses (0.0 MB to free)\n"
        "dry run: nothing was changed (ledger N MB)\n"
    )
    with sqlite3.connect(app.data_dir / LEDGER_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    conn.close()


def test_tasks_show_names_a_tasks_media(app: ServedApp) -> None:
    """Issue 16: the type, file name, mimetype and size of a media message."""
    pdf = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
    body = {
        "phone": "+5215512345678",
        "message": "Your invoice",
        "media": {
            "type": "document",
            "base64": base64.b64encode(pdf).decode(),
            "filename": "invoice-1042.pdf",
        },
    }
    reply = DaemonClient(app.url, None).request(
        "POST", "/messages", body, {"Content-Type": "application/json"}
    )
    assert reply.status == 202, reply
    task_id = reply.body["task_id"]
    task = app.wait_status(task_id, "SUCCESS")
    result = invoke("tasks", "show", task_id, **app.env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    [attempt] = task["history"]
    assert result.stdout == (
        f"{task_id}  SUCCESS  instance shop  phone 525512345678\n"
        f"  created {task['created_at']}  attempts 1  expires {task['expires_at']}\n"
        f"  media document invoice-1042.pdf (application/pdf, {len(pdf)} bytes)\n"
        f"  evolution key {task['result']['evolution_key']}  jid 525512345678@s.whatsapp.net\n"
        f"  {attempt['at']}  attempt sent\n"
    )
