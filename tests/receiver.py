"""A real HTTP receiver of callbacks, in a thread of its own: the app a test plays.

It records every request (headers and the exact body bytes) and answers what the test set:
a status (with headers), or holds the answer until released. `down()` closes the port (a dead
app: connection refused), `up()` opens it again on the same port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from tests.conftest import free_port


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str) -> Any:
        """The body as the standardwebhooks library verifies and parses it (raises if not)."""
        return Webhook(secret).verify(self.body, self.headers)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    status: int = 200
    answer_headers: dict[str, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    hold: threading.Event | None = None  # set: answer; unset: keep the request waiting

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._lock = threading.Lock()
        self._run(self._start())
        self.up()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.calls.append(Call(request.path, dict(request.headers), body))
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait)
        return web.Response(status=self.status, headers=self.answer_headers)

    def up(self) -> None:
        async def start() -> None:
            assert self._runner is not None
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()

        self._run(start())

    def down(self) -> None:
        async def stop() -> None:
            if self._site is not None:
                await self._site.stop()
                self._site = None

        self._run(stop())

    def received(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def wait_for(
        self, predicate: Callable[[list[Call]], bool], timeout: float = 20.0
    ) -> list[Call]:
        """Wait (a condition, not a duration) until the calls so far satisfy `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            calls = self.received()
            if predicate(calls):
                return calls
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: condition not met after {len(calls)} calls")
            time.sleep(0.02)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()

        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
