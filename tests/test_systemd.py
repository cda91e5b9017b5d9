"""The sd_notify conversation over a real AF_UNIX datagram socket, and the unit's sandbox score."""

from __future__ import annotations

import configparser
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evomsgd import systemd
from evomsgd.config import Settings
from tests.conftest import ROOT, daemon_env, free_port

UNIT = ROOT / "evomsgd.service"
MAX_EXPOSURE = 1.5


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int  # the sender, as systemd sees it (SCM_CREDENTIALS)
    ppid: int | None  # its parent when received, None if it is gone


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket that learns each sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.received: list[Notification] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Notification | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        note = Notification(fields, pid, _ppid(pid))
        self.received.append(note)
        return note

    def wait_for(self, key: str, value: str, timeout: float = 20.0) -> Notification:
        deadline = time.monotonic() + timeout
        while (note := self.receive(deadline - time.monotonic())) is not None:
            if note.fields.get(key) == value:
                return note
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.received}")

    def drain(self) -> None:
        while self.receive(0.001) is not None:
            pass

    def count(self, key: str, value: str) -> int:
        return sum(n.fields.get(key) == value for n in self.received)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        status: int = resp.status
        return status


@dataclass
class Conversation:
    main_pid: int  # the process systemd would have started (and named in WATCHDOG_PID)
    ready: Notification
    log: str
    notes: list[Notification] = field(default_factory=list)


def notify_conversation(argv: list[str], tmp_path: Path) -> Conversation:
    """Run `argv serve` as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID = the main
    PID), check READY, the watchdog and STOPPING, and return what was said."""
    listener = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    env = daemon_env(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="200000")
    log_path = tmp_path / "daemon.log"
    # `exec` keeps the shell's pid, so WATCHDOG_PID names the main process, as systemd does it.
    command = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
    command += ["serve", "--sandbox", "--data-dir", str(tmp_path / "data"), "--port", str(port)]
    with log_path.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, stderr=stderr, cwd=tmp_path)
    try:
        ready = listener.wait_for("READY", "1")
        assert _health(port) == 200, "READY=1 before the daemon answers /health"
        assert ready.fields["STATUS"] == f"listening on http://127.0.0.1:{port}"
        for _ in range(3):  # every 0.1 s (half of WATCHDOG_USEC) from the event loop
            listener.wait_for("WATCHDOG", "1", timeout=5)
        proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING", "1")
        assert int(stopping.fields["EXTEND_TIMEOUT_USEC"]) >= 30_000_000  # default drain 30 s
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    listener.drain()
    listener.close()
    assert listener.count("READY", "1") == 1
    assert listener.count("STOPPING", "1") == 1
    return Conversation(proc.pid, ready, log_path.read_text(), listener.received)


# -- the datagram protocol --------------------------------------------------------------------


def test_notify_sends_one_datagram_of_newline_separated_fields(tmp_path: Path) -> None:
    listener = NotifySocket(tmp_path / "n.sock")
    assert systemd.notify("READY=1", "STATUS=up", env={"NOTIFY_SOCKET": str(listener.path)})
    note = listener.receive(5)
    assert note is not None
    assert note.fields == {"READY": "1", "STATUS": "up"}
    assert note.pid == os.getpid()
    listener.close()


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"evomsgd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize("address", ["", "vsock:2:1234"])
def test_notify_without_a_unix_socket_is_a_no_op(address: str) -> None:
    assert not systemd.notify("READY=1", env={"NOTIFY_SOCKET": address})


def test_a_vanished_notify_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "evomsgd.systemd"):
        assert not systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert f"cannot notify systemd at {tmp_path / 'gone'}" in caplog.text


@pytest.mark.parametrize(
    ("env", "frozen", "interval"),
    [
        ({}, False, None),
        ({"WATCHDOG_USEC": "30000000"}, False, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, False, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, False, None),
        # our parent is only our main PID when we are the child of a single-file bootloader
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{ppid}"}, False, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{ppid}"}, True, 15.0),
        ({"WATCHDOG_USEC": "0"}, False, None),
        ({"WATCHDOG_USEC": "soon"}, False, None),
    ],
)
def test_the_watchdog_is_ours_only_when_it_names_us_or_our_bootloader(
    env: dict[str, str], frozen: bool, interval: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "frozen", frozen, raising=False)
    env = {k: v.format(pid=os.getpid(), ppid=os.getppid()) for k, v in env.items()}
    assert systemd.watchdog_interval(env) == interval


# -- the daemon's side of the conversation ----------------------------------------------------


def test_the_daemon_says_ready_when_it_serves_pings_the_watchdog_and_says_stopping(
    tmp_path: Path,
) -> None:
    talk = notify_conversation([sys.executable, "-m", "evomsgd"], tmp_path)
    assert {n.pid for n in talk.notes} == {talk.main_pid}
    assert talk.log.count("received SIGTERM") == 1


# -- the unit ---------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_unit_outlasts_the_drain_and_watches_the_event_loop() -> None:
    service = _unit()["Service"]
    drain = Settings.model_fields["drain_timeout"].default
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "all"  # the notifier is the bootloader's child
    assert service["KillMode"] == "mixed"  # SIGTERM reaches the daemon once, via the bootloader
    assert _seconds(service["TimeoutStopSec"]) > drain
    assert _seconds(service["WatchdogSec"]) >= 10
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "evomsgd"
    assert service["EnvironmentFile"] == "-/etc/evomsgd/evomsgd.env"
    assert service["DynamicUser"] == "yes"
    # unpacked where exec is allowed, tmpfiles does not age, and systemd cleans after a crash
    assert service["RuntimeDirectory"] == "evomsgd"
    assert service["Environment"] == "TMPDIR=/run/evomsgd"
    assert service["ExecPaths"] == "/run/evomsgd"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd; packaging/install-deps.sh)",
)
def test_the_unit_sandbox_scores_at_most_1_5() -> None:
    threshold = f"--threshold={MAX_EXPOSURE * 10:.0f}"  # in tenths
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", threshold, str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for evomsgd.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_daemon_raises_its_open_files_limit_for_the_sends_in_flight() -> None:
    # In a child process: the limit is process-wide and this one is the test runner's.
    code = (
        "import resource\n"
        "from evomsgd.daemon import raise_open_files\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(raise_open_files(2000)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    soft, now, hard = (int(v) for v in out)
    expected = 2000 if hard < 0 or hard >= 2000 else hard
    assert soft == now == expected


def test_the_unit_gives_the_sends_in_flight_their_sockets() -> None:
    unit = (ROOT / "evomsgd.service").read_text()
    limit = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert limit >= 1024 + 256  # EVOMSGD_MAX_IN_FLIGHT's default and the daemon's own files


def test_the_daemon_gives_freed_heap_pages_back_after_start_up() -> None:
    # In a child process: free most of many C-heap blocks while every hundredth stays (so the
    # heap's top is in use and glibc cannot shrink it by itself), then ask for the pages back.
    code = (
        "from evomsgd.daemon import release_free_memory\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "blocks = [bytes(2000) for _ in range(60_000)]\n"
        "kept = blocks[::100]\n"
        "del blocks\n"
        "before = rss()\n"
        "print(release_free_memory(), before, rss())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    trimmed, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert trimmed  # glibc (Debian, the binary's build host)
    assert before - after > 50_000, (before, after)  # most of the ~120 MB freed, in kB
