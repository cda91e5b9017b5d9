"""evomsgd's benchmark: prints one table of figures measured on this machine, in one run.

    .venv/bin/python bench/run.py            # everything (~4 min; needs `wrk`: apt-get install wrk)
    .venv/bin/python bench/run.py --quick    # smaller counts, for a smoke run
    .venv/bin/python bench/run.py --only accept   # one part (accept, delivery, memory, ledger, start)

`start` needs the binary: packaging/build.sh first (or --binary PATH).

Ratios matter more than absolutes: the machines are shared and noisy, so every comparison
(evomsgd vs a bare aiohttp handler, full vs normal durability, empty vs 1M-row ledger, the binary
vs the pip-installed command) is measured back to back in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# packaging/ is not a package (and its name is PyPI's `packaging`): import measure.py by its folder.
sys.path.insert(0, str(ROOT / "packaging"))

from measure import time_to_ready  # noqa: E402

from tests.conftest import API_KEY, FakeProcess, daemon_env, free_port  # noqa: E402

DIST = ROOT / "dist" / "evomsgd"
# The console script `pip install` put next to this interpreter (.venv/bin/evomsgd).
PIP_COMMAND = Path(sys.executable).with_name("evomsgd")

BODY = json.dumps({"phone": "+5511988887777", "message": "Your code is 123456"})
# A different valid phone on every request, as real traffic has (no cache can help).
POST_LUA = """
counter = 0
request = function()
    counter = counter + 1
    local body = string.format('{"phone": "+5511%09d", "message": "Your code is 123456"}', 988000000 + counter % 1000000)
    return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""

BARE_SERVER = """
import sys
from aiohttp import web
async def handler(request):
    await request.read()
    return web.json_response({"success": True, "message": "ok", "task_id": "x"}, status=202)
app = web.Application()
app.router.add_post("/messages", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

# The bare handler plus only the validation every message needs (JSON, the request model, the
# phone number) and no storage: the most any design in one Python process could reach.
VALIDATING_SERVER = """
import sys
from aiohttp import web
from evomsgd.models import SendRequest
from evomsgd.phone import normalize
async def handler(request):
    req = SendRequest.model_validate_json(await request.read())
    normalize(req.phone)
    return web.json_response({"success": True, "message": "ok", "task_id": "x"}, status=202)
app = web.Application()
app.router.add_post("/messages", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, seconds: int, connections: int = 32, lua: str | None = None, pid: int | None = None
) -> dict[str, float]:
    """Run wrk; returns requests/s, latency percentiles in ms and CPU microseconds per request
    of the server `pid` and of wrk itself."""
    before = cpu_seconds(pid) if pid else 0.0
    own_before = os.times()
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    script = None
    if lua:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        script.write(lua)
        script.close()
        cmd += ["-s", script.name]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    if script:
        os.unlink(script.name)

    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = rate * seconds
    own_after = os.times()
    wrk_cpu = (
        own_after.children_user
        + own_after.children_system
        - own_before.children_user
        - own_before.children_system
    )
    return {
        "rps": rate,
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
        "server_us": (cpu_seconds(pid) - before) / requests * 1e6 if pid else 0.0,
        "wrk_us": wrk_cpu / requests * 1e6,
    }


class Daemon:
    def __init__(self, data_dir: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "evomsgd",
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(self.port),
                *args,
            ],
            # Default settings (INFO logging), except backpressure:
            # a paused lane fills up on purpose here, and at the default 1 s pace ~86,000 waiting
            # messages would already get 429 "would expire first". Pace 0 skips that estimate.
            cwd=ROOT,
            env=daemon_env(
                **{"EVOMSGD_MAX_WAITING": "100000000", "EVOMSGD_SEND_INTERVAL": "0", **env}
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/health")

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def counts(self) -> dict[str, int]:
        return dict(self.call("GET", "/health")[1]["counts"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def accept_rate(tmp: Path, seconds: int) -> list[tuple[str, str]]:
    rows = []
    ceiling: dict[str, float] = {}
    for label, server in (
        ("bare aiohttp handler, POST, 32 connections", BARE_SERVER),
        ("bare handler + validation only (JSON, model, phone; no storage)", VALIDATING_SERVER),
    ):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", server, str(port)], cwd=ROOT)
        wait_http(f"http://127.0.0.1:{port}/")
        result = wrk(f"http://127.0.0.1:{port}/messages", seconds, lua=POST_LUA, pid=proc.pid)
        proc.terminate()
        proc.wait()
        ceiling = ceiling or result
        rows.append((label, _rate(result, ceiling)))
    rows.append(insert_cost(tmp))
    for durability in ("full", "normal"):
        daemon = Daemon(
            tmp / f"accept-{durability}",
            "--sandbox",
            "--instance",
            "bench",
            "--durability",
            durability,
        )
        daemon.call("POST", "/instances/bench/pause")  # measure acceptance alone
        result = wrk(daemon.url + "/messages", seconds, lua=POST_LUA, pid=daemon.proc.pid)
        daemon.stop()
        rows.append((f"evomsgd POST /messages, durability={durability}", _rate(result, ceiling)))
    return rows


def insert_cost(tmp: Path, count: int = 32_000, batch: int = 32) -> tuple[str, str]:
    """The ledger write alone: Store.insert_messages in batches the size of 32 clients' group commit."""
    from evomsgd import clock, ids
    from evomsgd.ledger.records import NewMessage
    from evomsgd.ledger.store import Store

    (tmp / "insert").mkdir()
    store = Store(tmp / "insert", durability="full")
    now = clock.now()
    news = [
        NewMessage(
            id=ids.task_id(now),
            instance="bench",
            phone=f"5511{988000000 + i}",
            phone_input="+55",
            text="Your code is 123456",
            priority=0,
            created_at=now,
            send_at=None,
            expires_at=now + 86400,
            sandbox=True,
        )
        for i in range(count)
    ]
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, count, batch):
        store.insert_messages(news[start : start + batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store.close()
    return (
        f"ledger insert alone, {batch}-row fsynced commits (no HTTP)",
        f"{count / wall:,.0f} rows/s, CPU/row {cpu / count * 1e6:.0f} us",
    )


def _rate(r: dict[str, float], ceiling: dict[str, float] | None = None) -> str:
    errors = f", {r['errors']:.0f} non-2xx" if r["errors"] else ""
    text = f"{r['rps']:,.0f} req/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms{errors}"
    if ceiling is not None:
        text += (
            f", CPU/request: server {r['server_us']:.0f} us, wrk {r['wrk_us']:.0f} us"
            f"  = {100 * r['rps'] / ceiling['rps']:.0f}% of bare"
        )
    return text


def delivery(tmp: Path, count: int) -> list[tuple[str, str]]:
    fake = FakeProcess("--instances", "bench")
    daemon = Daemon(
        tmp / "delivery",
        EVOLUTION_API_URL=fake.url,
        EVOLUTION_API_KEY=API_KEY,
        EVOLUTION_INSTANCE_NAME="bench",
        EVOMSGD_SEND_INTERVAL="0",
        EVOMSGD_WORKERS="8",
    )
    try:
        # Pickup latency: one message at a time into an idle daemon; arrival stamped by the fake
        # with the same CLOCK_MONOTONIC.
        pickups = []
        for i in range(100):
            time.sleep(0.05)  # let the daemon go idle between samples
            status, body = daemon.call(
                "POST", "/messages", {"phone": f"+5511{988000000 + i}", "message": "p"}
            )
            accepted_at = time.monotonic()
            assert status == 202, body
            while True:
                received = [r for r in fake.received() if r["number"] == f"5511{988000000 + i}"]
                if received:
                    pickups.append((received[0]["at"] - accepted_at) * 1000)
                    break
                time.sleep(0.002)
        pickups.sort()
        p50, p99 = statistics.median(pickups), pickups[int(len(pickups) * 0.99) - 1]
        # Throughput: queue `count` messages, then time until every one is SUCCESS.
        daemon.call("POST", "/instances/bench/pause")
        asyncio.run(_post_many(daemon.url, count))
        start = time.monotonic()
        daemon.call("POST", "/instances/bench/resume")
        while daemon.counts()["SUCCESS"] < count + 100:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
    finally:
        daemon.stop()
        fake.stop()
    return [
        (
            "pickup latency, 202 -> Evolution call (idle daemon)",
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (n=100)",
        ),
        (
            f"end-to-end delivery, {count:,} messages, no pacing, 8 workers",
            f"{count / elapsed:,.0f} messages/s",
        ),
    ]


async def _post_many(url: str, count: int, concurrency: int = 32) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async with session.post(
                    url + "/messages", json={"phone": f"+5511{989000000 + i}", "message": "t"}
                ) as r:
                    assert r.status == 202, await r.text()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def memory(tmp: Path, count: int) -> list[tuple[str, str]]:
    daemon = Daemon(tmp / "memory", "--sandbox", "--instance", "bench", EVOMSGD_SEND_INTERVAL="0")
    try:
        time.sleep(1.0)
        idle = daemon.rss_mb()
        asyncio.run(_post_many(daemon.url, count))
        while daemon.counts()["SUCCESS"] < count:
            time.sleep(0.2)
        after = daemon.rss_mb()
    finally:
        daemon.stop()
    return [
        ("resident memory, idle", f"{idle:.1f} MB"),
        (f"resident memory after {count:,} messages", f"{after:.1f} MB"),
    ]


def seed(data_dir: Path, rows: int) -> str:
    """Write `rows` finished messages (and their attempt events) straight into a new ledger."""
    from evomsgd import clock, ids
    from evomsgd.ledger.store import Store

    Store(data_dir).close()  # create the schema
    conn = sqlite3.connect(data_dir / "evomsgd.db", isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    some_id = ""
    batch = []
    start = datetime(2026, 11, 1, 10, tzinfo=UTC).timestamp()
    for i in range(rows):
        created = start + i * 20 * 86_400 / rows  # 20 days of history, oldest first
        task_id = ids.task_id(created)  # as the daemon would have made it then
        some_id = task_id if i == rows // 2 else some_id
        ts = clock.to_db(created)
        batch.append(
            (
                task_id,
                "SUCCESS",
                "bench",
                f"5511{980000000 + i % 10_000_000}",
                "+55",
                "text",
                ts,
                ts,
                ts,
                1,
                "KEY",
                f"5511{980000000 + i}@s.whatsapp.net",
            )
        )
        if len(batch) == 50_000:
            _flush(conn, batch)
    _flush(conn, batch)
    conn.execute("COMMIT")
    conn.close()
    return some_id


def _flush(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO messages (id, status, instance, phone, phone_input, text, created_at, expires_at,"
        " finished_at, attempts, evolution_key, remote_jid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        batch,
    )
    conn.executemany(
        "INSERT INTO events (message_id, at, instance, event, attempt, outcome) VALUES (?, ?, 'bench', 'attempt', 1, 'sent')",
        [(row[0], row[6]) for row in batch],
    )
    batch.clear()


def big_ledger(tmp: Path, rows: int, seconds: int) -> list[tuple[str, str]]:
    out = []
    results = {}
    for label, size in (("empty", 0), (f"{rows:,} rows", rows)):
        data_dir = tmp / f"ledger-{size}"
        data_dir.mkdir()
        some_id = seed(data_dir, size) if size else None
        daemon = Daemon(data_dir, "--sandbox", "--instance", "bench")
        daemon.call("POST", "/instances/bench/pause")
        if some_id is None:
            some_id = daemon.call("POST", "/messages", json.loads(BODY))[1]["task_id"]
        post = wrk(daemon.url + "/messages", seconds, lua=POST_LUA)
        get = wrk(f"{daemon.url}/tasks/{some_id}", seconds)
        daemon.stop()
        results[label] = (post, get)
        out.append((f"ledger {label}: POST /messages", _rate(post)))
        out.append((f"ledger {label}: GET /tasks/{{id}}", _rate(get)))
    (empty_post, empty_get), (big_post, big_get) = results.values()
    out.append(
        (
            "1M-row ledger vs empty",
            f"POST {100 * big_post['rps'] / empty_post['rps']:.0f}%, "
            f"GET p50 {big_get['p50']:.2f} vs {empty_get['p50']:.2f} ms",
        )
    )
    return out


def start_time(binary: Path, starts: int) -> list[tuple[str, str]]:
    """`serve --sandbox` to the first /health 200: the binary vs the pip-installed command.

    Taken in turns, so both see the same load; each binary start unpacks it afresh.
    """
    frozen, installed = [], []
    for _ in range(starts):
        frozen.append(time_to_ready(str(binary)))
        installed.append(time_to_ready(str(PIP_COMMAND)))
    ratio = statistics.median(frozen) / statistics.median(installed)
    return [
        (
            f"start to first /health 200, median of {starts}: binary vs pip-installed",
            f"{statistics.median(frozen):.2f} s vs {statistics.median(installed):.2f} s"
            f" = {ratio:.2f}x",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts for a smoke run")
    parser.add_argument(
        "--only",
        choices=["accept", "delivery", "memory", "ledger", "start"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--binary", type=Path, default=DIST, help="the binary `start` times")
    args = parser.parse_args()
    seconds = 3 if args.quick else 10
    parts = set(args.only or ["accept", "delivery", "memory", "ledger", "start"])
    if "start" in parts:  # checked first: a missing file should not cost the other parts' minutes
        fixes = {
            args.binary: "build it with packaging/build.sh, or pass --binary PATH",
            PIP_COMMAND: "run bench/run.py with the Python of a venv where evomsgd is installed",
        }
        for need, fix in fixes.items():
            if not need.is_file():
                parser.error(f"{need} is missing - {fix}")
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "accept" in parts:
            rows += accept_rate(tmp, seconds)
        if "delivery" in parts:
            rows += delivery(tmp, 1000 if args.quick else 5000)
        if "memory" in parts:
            rows += memory(tmp, 5000 if args.quick else 100_000)
        if "ledger" in parts:
            rows += big_ledger(tmp, 50_000 if args.quick else 1_000_000, seconds)
        if "start" in parts:
            rows += start_time(args.binary, 5 if args.quick else 15)
    width = max(len(name) for name, _ in rows)
    print(f"evomsgd benchmark - {os.cpu_count()} cores, python {sys.version.split()[0]}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
