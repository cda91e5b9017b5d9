"""Pooled keep-alive connections to Evolution: reused while fresh, never a false AMBIGUOUS.

Node closes an idle keep-alive connection after `server.keepAliveTimeout` (5 s by default); the
fake does the same after `idle_close`. A send on a connection the server has just closed fails
without an answer, which would read as AMBIGUOUS - a possible duplicate for a message that never
went out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from evomsgd.evolution.client import IDLE_TIMEOUT, EvolutionClient, _PoolConnector, new_session
from evomsgd.evolution.outcomes import OutcomeKind
from tests.fake_evolution import FakeEvolution, Fault

KEY = "sk-EVO-pool-4b1d9e"
K = OutcomeKind


def numbers(start: int, count: int) -> list[str]:
    return [f"55119{n:08d}" for n in range(start, start + count)]


async def send_each(client: EvolutionClient, batch: list[str]) -> list[OutcomeKind]:
    """One after the other, so a free pooled connection is always there to reuse."""
    return [(await client.send_text("main", n, "Your code is 123456")).kind for n in batch]


def assert_each_delivered_once(fake: FakeEvolution, sent: list[str]) -> None:
    assert sorted(r.number or "" for r in fake.delivered) == sorted(sent)


def dropped_dead(client: EvolutionClient) -> int:
    connector = client._session.connector
    assert isinstance(connector, _PoolConnector)
    return connector.dropped_dead


@pytest.fixture
async def fake() -> AsyncIterator[FakeEvolution]:
    async with FakeEvolution(api_key=KEY) as f:
        yield f


async def test_sequential_sends_share_one_connection(fake: FakeEvolution) -> None:
    batch = numbers(0, 10)
    async with new_session() as session:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0)
        assert await send_each(client, batch) == [K.SENT] * 10
        assert (await client.connection_state("main")).kind is None
    assert fake.connections_opened == 1
    assert fake.requests_seen == 11
    assert "connection" not in {h.lower() for r in fake.received for h in r.headers}
    assert_each_delivered_once(fake, batch)


@pytest.mark.parametrize(
    ("server_idle", "our_idle"),
    [(1.0, 0.2), (5.0, IDLE_TIMEOUT)],  # short, then node's default against ours
    ids=["short", "node-default"],
)
async def test_our_idle_timeout_closes_first_so_the_server_never_has_to(
    fake: FakeEvolution, server_idle: float, our_idle: float
) -> None:
    fake.idle_close = server_idle
    first, second = numbers(0, 3), numbers(3, 3)
    async with new_session(idle_timeout=our_idle) as session:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0)
        assert await send_each(client, first) == [K.SENT] * 3
        assert fake.requests_per_connection == [3]
        # Our pool lets the idle connection go before the fake's timer fires.
        await fake.wait_for_connections(lambda f: f.connections_open == 0, timeout=server_idle)
        assert fake.idle_closes == 0
        assert await send_each(client, second) == [K.SENT] * 3
        assert dropped_dead(client) == 0
    assert fake.connections_opened == 2
    assert fake.idle_closes == 0
    assert_each_delivered_once(fake, first + second)


class FakeInThread:
    """The fake on its own event loop, so it closes sockets while the client's loop is busy."""

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.fake: FakeEvolution | None = None

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        fake = FakeEvolution(api_key=KEY)
        for name, value in self._settings.items():
            setattr(fake, name, value)
        async with fake:
            self.fake = fake
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> FakeEvolution:
        self._thread.start()
        assert self._ready.wait(10), "the fake did not start"
        assert self.fake is not None
        return self.fake

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def block_until(condition: Any, timeout: float = 5.0) -> None:
    """Wait WITHOUT running the event loop, so the client cannot notice the server's FIN."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def threaded_fake() -> Iterator[FakeEvolution]:
    with FakeInThread(idle_close=0.3) as f:
        yield f


async def test_server_closing_idle_connections_first_gives_no_false_ambiguous(
    threaded_fake: FakeEvolution,
) -> None:
    # The race: the fake closes idle connections far sooner (0.3 s) than our pool (2 s), and
    # its FIN sits unread in our socket when the next send takes the connection from the pool.
    fake = threaded_fake
    first, second = numbers(0, 3), numbers(3, 3)
    async with new_session() as session:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0)
        assert await send_each(client, first) == [K.SENT] * 3
        block_until(lambda: fake.idle_closes == 1)
        assert await send_each(client, second) == [K.SENT] * 3
        assert dropped_dead(client) == 1  # the guard, not luck, avoided the dead connection
    assert fake.connections_opened == 2
    assert_each_delivered_once(fake, first + second)


async def test_the_pool_does_not_cap_sends_in_flight(fake: FakeEvolution) -> None:
    # aiohttp's default pool holds 100 connections; the daemon bounds sends in flight itself.
    count = 150
    batch = numbers(0, count)
    fake.script(responses=[Fault.HANG] * count)
    async with new_session() as session:
        client = EvolutionClient(session, fake.url, KEY, timeout=10.0)
        sends = asyncio.gather(*(client.send_text("main", n, "hi") for n in batch))
        await fake.wait_for_arrivals(count)
        assert fake.requests_in_flight == fake.peak_connections == count
        fake.release()
        outcomes = await sends
    assert [o.kind for o in outcomes] == [K.SENT] * count
    assert_each_delivered_once(fake, batch)


class _ClosingOnce(_PoolConnector):
    """A connection that starts closing between the pool's check and the write: the narrow race
    left after `_PoolConnector`'s check (a FIN arriving in that instant)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sabotaged = 0

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        if self.sabotaged == 0 and conn.transport is not None:
            self.sabotaged += 1
            # The transport reports itself closing, as it does once the loop has seen the
            # server's FIN, so aiohttp refuses to write; nothing has been written yet.
            conn.transport.is_closing = lambda: True  # type: ignore[method-assign]
        return conn


async def test_a_connection_closing_before_the_write_is_retried_not_ambiguous(
    fake: FakeEvolution,
) -> None:
    import aiohttp

    from evomsgd.evolution.outcomes import never_written

    connector = _ClosingOnce(keepalive_timeout=IDLE_TIMEOUT, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0)
        outcome = await client.send_text("main", "5511900000001", "Your code is 123456")
    assert connector.sabotaged == 1
    assert outcome.kind is K.SENT  # retried on a new connection, not a possible duplicate
    assert_each_delivered_once(fake, ["5511900000001"])
    # The rule itself, on the exception aiohttp raises there (client_reqrep.py, write_bytes).
    refused = aiohttp.ClientOSError(None, "Can not write request body for http://x/")
    refused.__cause__ = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    assert never_written(refused)
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    assert not never_written(reset)  # a reset after writing may have been read: ambiguous
