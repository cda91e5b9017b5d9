"""The dashboard's callbacks, in a real browser: a message's callback attempts, the endpoints'
health, and re-enabling an endpoint a 410 disabled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import MakeClient, post
from tests.fake_evolution import FakeEvolution
from tests.receiver import Receiver
from tests.test_callbacks import _app
from tests.test_dashboard import browser, open_dashboard

__all__ = ["browser"]  # the fixture, shared with test_dashboard


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(status=410)
    yield server
    server.close()


async def test_the_dashboard_shows_callback_attempts_and_enables_an_endpoint(
    make_client: MakeClient,
    fake: FakeEvolution,
    receiver: Receiver,
    browser: Any,
) -> None:
    client = await _app(make_client, fake, receiver)
    task_id = (await post(client))["task_id"]
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 1)

    page, problems = await open_dashboard(browser, client)
    endpoint = page.locator('#endpoints tr[data-endpoint="default"][data-disabled="1"]')
    await endpoint.wait_for()
    assert "endpoint 'default' answered 410 Gone" in await endpoint.inner_text()
    assert await page.locator("#callbacks-panel").is_visible()

    await page.locator(f'#recent tr[data-task-id="{task_id}"]').click()  # opens its details
    attempt = page.locator(f'#recent tr[data-details-for="{task_id}"] .callback-list li')
    await attempt.first.wait_for()
    text = await attempt.first.inner_text()
    assert "message.sent" in text and "pending" in text and "HTTP 410" in text

    receiver.status = 200
    async with page.expect_request(lambda req: req.url.endswith("/enable")) as info:
        await endpoint.locator('button[data-action="enable"]').click()
    assert (await info.value).method == "POST"
    await page.locator("#toast", has_text="Endpoint default enabled").wait_for()
    await asyncio.to_thread(receiver.wait_for, lambda calls: len(calls) == 2)
    await page.locator('#endpoints tr[data-endpoint="default"][data-disabled="0"]').wait_for()
    sent = page.locator(
        f'#recent tr[data-details-for="{task_id}"] .callback-list li[data-state="sent"]'
    )
    await sent.wait_for(timeout=20_000)
    assert problems == []
