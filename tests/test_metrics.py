"""GET /metrics through the real app: counters of real deliveries, ledger gauges, index reads."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evomsgd import __version__, clock
from evomsgd.app import STORE
from evomsgd.web.metrics import METRICS
from tests.conftest import JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: TestClient[Any, Any]) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape_until(
    client: TestClient[Any, Any], ready: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(client)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never reached the expected values"
        await asyncio.sleep(0.05)


async def test_deliveries_are_counted_by_instance_and_error_kind(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    # A retry an hour away keeps the third message in RETRY for the whole test.
    client = await make_client(fast_settings(evolution_url=fake.url, retry_delay=3600))
    fake.script([Fault.NOT_ON_WHATSAPP], number="5511900000002")
    fake.script([Fault.TIMED_OUT], number="5511900000003")
    ids = [
        (await post(client, phone=phone))["task_id"]
        for phone in ("+5511900000001", "+5511900000002", "+5511900000003")
    ]
    assert (await wait_status(client, ids[0]))["status"] == "SUCCESS"
    assert (await wait_status(client, ids[1]))["status"] == "FAILURE"
    await wait_status(client, ids[2], {"RETRY"})

    samples = await scrape(client)
    assert value(samples, "evomsgd_messages_accepted_total", evolution_instance="main") == 3
    assert value(samples, "evomsgd_messages_sent_total", evolution_instance="main") == 1
    failed = "evomsgd_messages_failed_total"
    assert value(samples, failed, evolution_instance="main", error_kind="permanent") == 1
    assert value(samples, failed, evolution_instance="main", error_kind="transient") == 0
    retried = "evomsgd_messages_retried_total"
    assert value(samples, retried, evolution_instance="main", error_kind="transient") == 1
    assert value(samples, "evomsgd_accept_to_sent_seconds_count", evolution_instance="main") == 1
    calls = "evomsgd_evolution_call_seconds_count"
    assert value(samples, calls, evolution_instance="main", outcome="sent") == 1
    assert value(samples, calls, evolution_instance="main", outcome="permanent") == 1
    assert value(samples, calls, evolution_instance="main", outcome="transient") == 1
    assert (
        value(
            samples, "evomsgd_evolution_call_seconds_sum", evolution_instance="main", outcome="sent"
        )
        > 0
    )
    assert value(samples, "evomsgd_messages", status="SUCCESS") == 1
    assert value(samples, "evomsgd_messages", status="FAILURE") == 1
    assert value(samples, "evomsgd_messages", status="RETRY") == 1
    assert (
        value(samples, "evomsgd_messages_waiting", evolution_instance="main", status="RETRY") == 1
    )
    assert (
        value(samples, "evomsgd_messages_waiting", evolution_instance="main", status="PENDING") == 0
    )
    # Waiting for a retry an hour from now is not being overdue.
    assert value(samples, "evomsgd_oldest_waiting_seconds", evolution_instance="main") == 0
    assert value(samples, "evomsgd_messages_expired_total", evolution_instance="main") == 0
    assert value(samples, "evomsgd_build_info", version=__version__, sandbox="false") == 1
    assert value(samples, "evomsgd_uptime_seconds") > 0
    assert value(samples, "evomsgd_ledger_up") == 1
    states = {
        labels: v for (name, labels), v in samples.items() if name == "evomsgd_instance_state"
    }
    assert sum(states.values()) == 1 and len(states) >= 7
    # No `_created` twin for every counter and histogram.
    assert not [name for name, _ in samples if name.endswith("_created")]


async def test_waiting_messages_by_status_and_the_oldest_due_one(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.post("/instances/main/pause", json={"reason": "maintenance"})
    assert resp.status == 200
    await post(client)
    await post(client, phone="+5511900000004")
    await post(client, send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())

    def overdue(samples: Samples) -> bool:
        return value(samples, "evomsgd_oldest_waiting_seconds", evolution_instance="main") >= 0.2

    samples = await scrape_until(client, overdue)
    waiting = "evomsgd_messages_waiting"
    assert value(samples, waiting, evolution_instance="main", status="PENDING") == 2
    assert value(samples, waiting, evolution_instance="main", status="SCHEDULED") == 1
    assert value(samples, waiting, evolution_instance="main", status="RETRY") == 0
    assert value(samples, "evomsgd_messages", status="PENDING") == 2
    assert value(samples, "evomsgd_instance_state", evolution_instance="main", state="paused") == 1


async def test_expiries_are_counted_once(client: TestClient[Any, Any]) -> None:
    assert (await client.post("/instances/main/pause", headers=JSON)).status == 200
    accepted = await post(client, expires_in=0.1)
    assert (await wait_status(client, accepted["task_id"]))["status"] == "EXPIRED"
    expired = "evomsgd_messages_expired_total"
    assert value(await scrape(client), expired, evolution_instance="main") == 1
    assert value(await scrape(client), expired, evolution_instance="main") == 1


async def test_every_app_has_its_own_registry(make_client: MakeClient, tmp_path: Path) -> None:
    settings = fast_settings(sandbox=True, default_instance="shop")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = await make_client(settings, tmp_path / "a")
    second = await make_client(settings, tmp_path / "b")
    await wait_status(first, (await post(first))["task_id"])
    accepted = "evomsgd_messages_accepted_total"
    assert value(await scrape(first), accepted, evolution_instance="shop") == 1
    assert value(await scrape(second), accepted, evolution_instance="shop") == 0
    assert (
        value(await scrape(first), "evomsgd_build_info", version=__version__, sandbox="true") == 1
    )


async def test_a_scrape_and_the_hourly_stats_never_scan_a_whole_table(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    """With a million messages a full scan per scrape takes seconds: every read must seek."""
    fake.script([Fault.NOT_ON_WHATSAPP], number="5511900000002")
    for phone in ("+5511900000001", "+5511900000002"):
        await wait_status(client, (await post(client, phone=phone))["task_id"])
    store, metrics = client.app[STORE], client.app[METRICS]

    def run_traced() -> list[str]:
        statements: list[str] = []
        reader = store._reader()  # this thread's read connection
        reader.set_trace_callback(statements.append)
        try:
            generate_latest(metrics.registry)
            store.attempt_counts(clock.now() - 86_400, 3600)
        finally:
            reader.set_trace_callback(None)
        return statements

    statements = [sql for sql in await asyncio.to_thread(run_traced) if "SELECT" in sql.upper()]
    assert len(statements) >= 5
    plans = sqlite3.connect(store.path)
    try:
        for sql in statements:
            plan = [row[3] for row in plans.execute("EXPLAIN QUERY PLAN " + sql)]
            scans = [step for step in plan if re.match(r"SCAN (messages|events|e)\b", step)]
            assert not scans, f"{sql}\n -> {plan}"
    finally:
        plans.close()
