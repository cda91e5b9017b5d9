"""Typing like a person (issue 17): Evolution's `delay`, the client's timeout, the in-flight bound."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from evomsgd.config import LaneSettings
from evomsgd.engine.typist import JITTER, MAX_DELAY, MIN_DELAY, typing_delay
from evomsgd.evolution.client import EvolutionClient, new_session
from evomsgd.evolution.outcomes import OutcomeKind
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution

KEY = "sk-EVO-typing"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as s:
        yield s


def test_the_delay_grows_with_the_text_within_bounds_and_is_never_the_same_twice() -> None:
    def at(length: int, seed: int = 7) -> float:
        return typing_delay("x" * length, random.Random(seed))

    assert at(0) < at(20) < at(60) < at(100)  # the same jitter draw: only the length differs
    assert at(10_000) == at(4_096) <= MAX_DELAY  # bounded: past 140 characters, no longer
    draws = {typing_delay("Your order has shipped", random.Random(seed)) for seed in range(50)}
    assert len(draws) == 50  # jittered
    assert all(
        MIN_DELAY * (1 - JITTER) <= d <= MAX_DELAY
        for seed in range(200)
        for d in [at(seed % 300, seed)]
    )


async def test_a_typing_send_longer_than_the_timeout_still_succeeds(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeEvolution(api_key=KEY) as fake:
        client = EvolutionClient(session, fake.url, KEY, timeout=0.3)
        # The fake holds the answer for the whole delay, as Evolution does: 1 s > the 0.3 s
        # timeout, which grows by the delay - so it is SENT, not an ambiguous timeout.
        outcome = await client.send_text("main", "5511988887777", "hi", delay=1.0)
        assert outcome.kind is OutcomeKind.SENT, outcome
        (sent,) = fake.received
        assert sent.delay == 1000 and sent.body["delay"] == 1000
        # Without a delay the body has none (Evolution would hold the request open).
        await client.send_text("main", "5511988887777", "hi")
        assert "delay" not in fake.received[1].body and fake.received[1].delay is None


async def test_v1_sends_the_delay_in_its_options(session: aiohttp.ClientSession) -> None:
    async with FakeEvolution(api_key=KEY, api_version=1) as fake:
        client = EvolutionClient(session, fake.url, KEY, api_version=1, timeout=5.0)
        outcome = await client.send_text("main", "5511988887777", "hi", delay=0.25)
        assert outcome.kind is OutcomeKind.SENT, outcome
        assert fake.received[0].body["options"] == {"delay": 250, "linkPreview": False}


async def test_typing_sends_hold_no_worker_thread_and_keep_to_the_in_flight_bound(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    fake.typing_gate = asyncio.Event()  # every "typing..." lasts until the test says so
    client = await make_client(
        fast_settings(
            evolution_url=fake.url,
            workers=1,
            max_in_flight=3,
            instances={"main": LaneSettings(typing=True)},
        )
    )
    tasks = [(await post(client, phone=f"+55119888800{n:02d}"))["task_id"] for n in range(5)]
    # One worker thread, three sends typing at once: the bound is the setting, not threads.
    await fake.wait_typing(3)
    assert fake.typing_now == 3
    fake.typing_gate.set()
    for task in tasks:
        body = await wait_status(client, task, {"SUCCESS"})
        assert body["status"] == "SUCCESS"
    assert fake.most_sends_in_progress == 3
    assert all(r.delay is not None and 800 <= r.delay <= MAX_DELAY * 1000 for r in fake.received)


async def test_typing_is_off_by_default(make_client: MakeClient, fake: FakeEvolution) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    await wait_status(client, (await post(client))["task_id"], {"SUCCESS"})
    assert fake.received[0].delay is None
