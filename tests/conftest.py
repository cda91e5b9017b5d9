"""Shared fixtures: real SQLite files in tmp_path, the real app, a real fake Evolution server."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from evomsgd.app import create_app
from evomsgd.config import Settings
from evomsgd.web.server import Runner, http_limits
from tests.fake_evolution import FakeEvolution

API_KEY = "test-api-key-5f2b9c"
FINAL = {"SUCCESS", "FAILURE", "CANCELED", "EXPIRED"}
ROOT = Path(__file__).resolve().parent.parent
# What every API client sends with POST/DELETE, body or not.
JSON = {"Content-Type": "application/json"}
# A page on another site calling the API.
FOREIGN = {"Origin": "https://evil.example"}


def fast_settings(**overrides: Any) -> Settings:
    """Settings with test-sized delays; everything else as a user would have it."""
    values: dict[str, Any] = {
        "evolution_key": API_KEY,
        "default_instance": "main",
        "send_interval": 0,
        "send_jitter": 0,
        "retry_delay": 0.05,
        "ambiguous_delay": 0.05,
        "probe_interval": 0.3,
        "rate_limit_pause": 0.2,
        "evolution_timeout": 2.0,
        "drain_timeout": 5.0,
        "workers": 2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def fake() -> AsyncIterator[FakeEvolution]:
    async with FakeEvolution(api_key=API_KEY, instances=["main", "other"]) as server:
        yield server


MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class DaemonTestServer(TestServer):
    """aiohttp's test server, started with the daemon's own runner."""

    async def _make_runner(self, **kwargs: Any) -> Runner:
        return Runner(self.app, **kwargs)


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    """Start the real app on a real ledger in tmp_path; returns its test client."""

    async def make(
        settings: Settings, data_dir: Path | None = None, **kwargs: Any
    ) -> TestClient[Any, Any]:
        app = create_app(settings, data_dir or tmp_path, **kwargs)
        # Started here with the daemon's own connection limits (aiohttp_client would start it
        # without them), so tests meet the server `evomsgd serve` runs.
        server = DaemonTestServer(app)
        await server.start_server(**http_limits(settings))
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient, fake: FakeEvolution) -> TestClient[Any, Any]:
    return await make_client(fast_settings(evolution_url=fake.url))


async def wait_status(
    client: TestClient[Any, Any],
    task_id: str,
    statuses: set[str] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll GET /tasks/{id} until its status is in `statuses` (default: any final one)."""
    wanted = statuses or FINAL
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(f"/tasks/{task_id}")
        body: dict[str, Any] = await resp.json()
        if body.get("status") in wanted:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(
                f"task {task_id} still {body.get('status')} after {timeout}s: {body}"
            )
        await asyncio.sleep(0.02)


async def post(client: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    """POST /messages and insist on 202."""
    body.setdefault("phone", "+5511988887777")
    body.setdefault("message", "Your code is 123456")
    resp = await client.post("/messages", json=body)
    data: dict[str, Any] = await resp.json()
    assert resp.status == 202, data
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a predicate (for real processes) until truthy or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class FakeProcess:
    """tests/fake_evolution.py running as its own process (for end-to-end runs)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "fake_evolution.py"),
                "--port",
                "0",
                "--api-key",
                API_KEY,
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line.startswith("READY "), f"fake did not start: {line!r}"
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def received(self) -> list[dict[str, Any]]:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + "/_fake/received", timeout=5) as resp:
            data: list[dict[str, Any]] = json.load(resp)
            return data

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOMSGD_", "EVOLUTION_"))}
    env.update(extra)
    return env
