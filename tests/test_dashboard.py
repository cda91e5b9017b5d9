"""The dashboard's files and GET /stats/hourly through the real app; the page in Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient

from evomsgd import clock
from evomsgd.ledger.store import LEDGER_FILE, Store
from evomsgd.models import ErrorBody
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault
from tests.test_media import PDF, PNG, b64
from tests.test_receipts import _hooked, _sent
from tests.test_security import add_token, wait_for_status

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Set to a path (docs/dashboard.png) to refresh the README's screenshot.
SCREENSHOT_ENV = "EVOMSGD_DASHBOARD_SCREENSHOT"
FAILING = "5511900000009"


async def test_the_page_loads_only_its_own_files_and_no_inline_code(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/dashboard")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp
    html = await resp.text()
    assert re.findall(r"<script\b[^>]*>([^<]*)</script>", html) == [""]  # one, external
    assert not re.search(r"\sstyle=|\son[a-z]+=|<style", html)
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
    assert (
        "/dashboard/static/dashboard.js" in assets and "/dashboard/static/dashboard.css" in assets
    )
    for path in assets:
        asset = await client.get(path)
        assert asset.status == 200, path
    js = await (await client.get("/dashboard/static/dashboard.js")).text()
    # Texts from clients and from Evolution are never parsed as HTML.
    assert not re.search(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write", js)


async def test_hourly_stats_count_sent_and_failed_attempts(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.script([Fault.NOT_ON_WHATSAPP], number=FAILING)
    for phone in ("+5511900000001", "+" + FAILING):
        await wait_status(client, (await post(client, phone=phone))["task_id"])
    resp = await client.get("/stats/hourly")
    assert resp.status == 200
    body = await resp.json()
    assert body["bucket_seconds"] == 3600
    assert len(body["buckets"]) == 24
    assert body["buckets"][-1]["sent"] == 1 and body["buckets"][-1]["failed"] == 1
    assert sum(b["sent"] + b["failed"] for b in body["buckets"][:-1]) == 0
    assert body["end"] > body["buckets"][-1]["start"] > body["start"] == body["buckets"][0]["start"]
    assert len((await (await client.get("/stats/hourly?hours=2")).json())["buckets"]) == 2


FUNNEL_ZERO = {"sent": 0, "delivered": 0, "read": 0, "failed": 0}


async def test_hourly_stats_count_the_delivery_funnel_of_the_messages_sent(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client, _ = await _hooked(make_client, fake)
    keys = [(await _sent(client))[1] for _ in range(5)]
    for key, statuses in zip(
        keys,
        [["DELIVERY_ACK"], ["DELIVERY_ACK", "READ"], ["READ"], ["SERVER_ACK", "ERROR"], []],
        strict=True,
    ):
        for status in statuses:
            assert await fake.receipt(key, status) == 200
    fake.script([Fault.NOT_ON_WHATSAPP], number=FAILING)  # a FAILURE is never in the funnel
    await wait_status(client, (await post(client, phone="+" + FAILING))["task_id"])
    body = await (await client.get("/stats/hourly")).json()
    last = body["buckets"][-1]
    # A READ without a DELIVERY_ACK was delivered too; failed is WhatsApp's ERROR receipt.
    assert last["funnel"] == {"sent": 5, "delivered": 3, "read": 2, "failed": 1}
    assert (last["sent"], last["failed"]) == (5, 1)  # the attempts, as before
    assert all(b["funnel"] == FUNNEL_ZERO for b in body["buckets"][:-1])


async def test_sandbox_messages_are_not_in_the_funnel(make_client: MakeClient) -> None:
    client = await make_client(fast_settings(sandbox=True))
    await wait_status(client, (await post(client))["task_id"])
    body = await (await client.get("/stats/hourly?hours=1")).json()
    assert body["buckets"][0]["funnel"] == FUNNEL_ZERO


@pytest.mark.parametrize("hours", ["0", "169", "-1", "1.5", "day"])
async def test_hourly_stats_reject_a_bad_window(client: TestClient[Any, Any], hours: str) -> None:
    resp = await client.get("/stats/hourly", params={"hours": hours})
    assert resp.status == 422
    error = ErrorBody.model_validate(await resp.json()).error
    assert error.code == "validation_error"
    assert error.message == f"hours must be a whole number from 1 to 168, not {hours!r}"
    assert error.details[0].field == "hours"


# -- in a real browser ----------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        )
    playwright = pytest.importorskip("playwright.async_api", reason="pip install -e '.[test]'")
    async with playwright.async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def open_dashboard(browser: Any, client: TestClient[Any, Any]) -> tuple[Any, list[str]]:
    """The dashboard in a new page, and the console errors and warnings it logs meanwhile."""
    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    await page.goto(str(client.make_url("/dashboard")))
    return page, problems


def backfill_a_day(data_dir: Path) -> int:
    """Earlier traffic in the ledger's history, so the chart has a day to draw: attempts, and
    the messages sent with the delivery states their receipts reached. Returns how many."""
    Store(data_dir).close()
    now = clock.now()
    rows, messages = [], []
    for hours_ago in range(1, 24):
        sent = 20 + (hours_ago * 37) % 45
        for n in range(sent + hours_ago % 4):
            outcome = "sent" if n < sent else "transient"
            at = clock.to_db(now - hours_ago * 3600 - n * 7)
            message_id = str(uuid.uuid4())
            rows.append((message_id, at, "main", "attempt", 1, outcome))
            if n < sent:  # most delivered, some of those read, a few failed
                delivery = ("read", "delivered", "read", "server_ack", "delivered")[n % 5]
                delivery = "failed" if n % 17 == 3 else delivery
                phone = f"55119{(hours_ago * 7919 + n * 104729) % 10**8:08d}"
                messages.append((message_id, phone, at, delivery))
    messages.sort(key=lambda m: m[2])  # oldest first, as they arrived
    with sqlite3.connect(data_dir / LEDGER_FILE) as conn:
        conn.executemany(
            "INSERT INTO events (message_id, at, instance, event, attempt, outcome)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO messages (id, status, instance, phone, phone_input, created_at,"
            " expires_at, finished_at, delivery, attempts)"
            " VALUES (?, 'SUCCESS', 'main', ?, ?, ?, ?, ?, ?, 1)",
            [(m, phone, "+" + phone, at, at, at, d) for m, phone, at, d in messages],
        )
    conn.close()
    return len(messages)


async def test_the_dashboard_shows_messages_and_retries_a_failed_one(
    make_client: MakeClient, fake: FakeEvolution, browser: Any, tmp_path: Path
) -> None:
    earlier = backfill_a_day(tmp_path)
    client = await make_client(fast_settings(evolution_url=fake.url))
    fake.script([Fault.NOT_ON_WHATSAPP], number=FAILING)  # the first send fails, a retry succeeds
    sent = [
        (await post(client, phone=phone, **extra))["task_id"]
        for phone, extra in [
            ("+5511900000001", {}),
            ("+5511900000002", {"instance_name": "other"}),
            ("+5511900000003", {"priority": "high"}),
        ]
    ]
    failed = (await post(client, phone="+" + FAILING))["task_id"]
    for task_id in sent:
        assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert (await wait_status(client, failed))["status"] == "FAILURE"
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    await post(client, phone="+5511900000004", send_at=later)

    page, problems = await open_dashboard(browser, client)

    row = page.locator(f'#recent tr[data-task-id="{sent[0]}"]')
    await row.wait_for()
    assert await row.get_attribute("data-status") == "SUCCESS"
    assert "+5511900000001" in await row.inner_text()
    assert (
        await page.locator('#counts [data-status="SUCCESS"] .card-value').inner_text()
        == f"{earlier + 3:,}"
    )
    assert await page.locator('#lanes tr[data-instance="other"]').count() == 1
    assert await page.locator("#chart rect.sent").count() >= 20
    assert await page.locator("#chart rect.read").count() >= 20

    failed_row = page.locator(f'#attention tr[data-task-id="{failed}"]')
    await failed_row.click()  # opens its history
    await page.locator(f'#attention tr[data-details-for="{failed}"] .history li').first.wait_for()
    assert "not on WhatsApp" in await failed_row.inner_text()
    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    if os.environ.get(SCREENSHOT_ENV):
        await page.screenshot(path=os.environ[SCREENSHOT_ENV], full_page=True)

    async with page.expect_request(lambda req: req.url.endswith(f"/tasks/{failed}/retry")) as info:
        await failed_row.locator('button[data-action="retry"]').click()
    request = await info.value
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    await page.locator("#toast", has_text="queued again").wait_for()
    done = await wait_status(client, failed, {"SUCCESS"})
    assert [entry["event"] for entry in done["history"]] == ["attempt", "requeued", "attempt"]
    await failed_row.wait_for(state="detached")
    await page.locator(f'#recent tr[data-task-id="{failed}"][data-status="SUCCESS"]').wait_for()

    await page.fill("#q", "+55 11 90000-0002")  # typed the way people write numbers
    await page.click('#search button[type="submit"]')
    await page.locator(f'#recent tr[data-task-id="{sent[0]}"]').wait_for(state="detached")
    assert await page.locator("#recent tr.task").count() == 1
    assert await page.locator(f'#recent tr[data-task-id="{sent[1]}"]').count() == 1
    assert problems == []


async def test_the_dashboard_sends_a_stored_token(make_client: MakeClient, browser: Any) -> None:
    client = await make_client(fast_settings(sandbox=True, default_instance="shop"))
    context = await browser.new_context()
    await context.add_init_script("window.localStorage.setItem('evomsgd_token', 'tok-123')")
    page = await context.new_page()
    async with page.expect_request(lambda req: req.url.endswith("/health")) as info:
        await page.goto(str(client.make_url("/dashboard")))
    assert (await info.value).headers["authorization"] == "Bearer tok-123"
    await context.close()


async def ids_of_one_moment(client: TestClient[Any, Any], count: int) -> list[str]:
    """Messages accepted together: ids sharing the 8 hex digits the Task column once showed."""
    for _ in range(2):  # those digits turn over every 65.5 s; a batch across the turn is redone
        ids = [(await post(client, phone=f"+55119000001{n:02d}"))["task_id"] for n in range(count)]
        if len({task_id[:8] for task_id in ids}) == 1:
            return ids
    raise AssertionError(f"no batch of {count} ids shares its first 8 digits: {ids}")


async def test_the_task_column_tells_apart_ids_of_one_moment_and_copies_them(
    make_client: MakeClient, browser: Any
) -> None:
    client = await make_client(fast_settings(sandbox=True))
    ids = await ids_of_one_moment(client, 6)
    context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    await page.goto(str(client.make_url("/dashboard")))
    shown = []
    for task_id in ids:
        cell = page.locator(f'#recent tr[data-task-id="{task_id}"] td.task-id')
        await cell.wait_for()
        assert await cell.get_attribute("title") == task_id  # the whole id on hover
        short = await cell.locator(".short-id").inner_text()
        assert short.lstrip("…") and task_id.endswith(short.lstrip("…")), short
        shown.append(short)
    assert len(set(shown)) == len(ids), shown

    target = page.locator(f'#recent tr[data-task-id="{ids[2]}"]')
    await target.locator('button[data-action="copy"]').click()
    await page.locator("#toast", has_text="Copied").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == ids[2]
    assert await target.get_attribute("aria-expanded") is None  # copying does not open the row
    assert problems == []
    await context.close()

    # Over http:// to another machine there is no navigator.clipboard: the id is selected instead.
    bare = await browser.new_context()
    await bare.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})"
    )
    page = await bare.new_page()
    await page.goto(str(client.make_url("/dashboard")))
    await page.locator(f'#recent tr[data-task-id="{ids[4]}"] button[data-action="copy"]').click()
    await page.locator("#toast [data-copy-fallback]").wait_for()
    assert await page.evaluate("window.getSelection().toString()") == ids[4]
    await bare.close()


async def lane_when(
    client: TestClient[Any, Any], instance: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll /instances until the instance's lane passes `check`; return it."""
    deadline = time.monotonic() + 10
    while True:
        lanes = (await (await client.get("/instances")).json())["instances"]
        lane: dict[str, Any] | None = next((x for x in lanes if x["instance"] == instance), None)
        if lane is not None and check(lane):
            return lane
        assert time.monotonic() < deadline, f"lane {instance} never passed the check: {lane}"
        await asyncio.sleep(0.02)


MUTED, FAILURE_RED = "rgb(107, 118, 133)", "rgb(194, 50, 43)"  # --muted, --failure


async def test_the_instances_panel_shows_a_current_problem_and_a_past_error_apart(
    make_client: MakeClient, fake: FakeEvolution, browser: Any, tmp_path: Path
) -> None:
    # An open lane probes once a minute, so a failed send, not a probe, finds each one closed.
    client = await make_client(fast_settings(evolution_url=fake.url, probe_interval=60))
    instances = ("main", "other")
    for n, instance in enumerate(instances):
        task = await post(client, phone=f"+551190000001{n}", instance_name=instance)
        assert (await wait_status(client, task["task_id"]))["status"] == "SUCCESS"
    retrying = {}
    for n, instance in enumerate(instances):
        fake.set_state(instance, "close")
        task = await post(client, phone=f"+551190000002{n}", instance_name=instance)
        retrying[instance] = task["task_id"]
        await wait_status(client, task["task_id"], {"RETRY"})
    for instance in instances:  # the pause's probe has said why
        await lane_when(
            client, instance, lambda lane: bool(lane["problem"]) and lane["health"] == "close"
        )
    fake.set_state("other", "open")
    assert (await wait_status(client, retrying["other"]))["status"] == "SUCCESS"
    recovered = await lane_when(client, "other", lambda lane: bool(lane["recovered_at"]))
    assert recovered["problem"] is None and recovered["last_error"]
    closed = await lane_when(client, "main", lambda lane: bool(lane["problem"]))

    page, problems = await open_dashboard(browser, client)

    problem = page.locator('#lanes tr[data-instance="main"] td.lane-problem')
    await problem.wait_for()
    assert await problem.inner_text() == closed["problem"]
    assert await problem.evaluate("cell => getComputedStyle(cell).color") == FAILURE_RED

    other = page.locator('#lanes tr[data-instance="other"]')
    history = other.locator("td.lane-history")
    assert re.fullmatch(r"last error \d+ s ago, recovered \d+ s ago", await history.inner_text())
    assert (await history.get_attribute("title") or "").startswith(recovered["last_error"] + "\n")
    assert await history.evaluate("cell => getComputedStyle(cell).color") == MUTED
    assert await other.locator(".lane-problem, .error-text").count() == 0
    assert recovered["last_error"] not in await other.inner_text()
    await page.locator("#lanes").screenshot(path=str(tmp_path / "lanes.png"))
    assert problems == []


async def test_the_delivery_column_and_the_funnel_show_receipts(
    make_client: MakeClient, fake: FakeEvolution, browser: Any, tmp_path: Path
) -> None:
    fake.add_instance("evo", integration="EVOLUTION")
    client, _ = await _hooked(make_client, fake)
    (delivered, key_d), (read, key_r), (waiting, _) = [await _sent(client) for _ in range(3)]
    assert await fake.receipt(key_d, "DELIVERY_ACK") == 200
    for status in ("DELIVERY_ACK", "READ"):
        assert await fake.receipt(key_r, status) == 200
    evo = (await post(client, instance_name="evo"))["task_id"]
    await wait_status(client, evo)
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    scheduled = (await post(client, phone="+5511900000004", send_at=later))["task_id"]
    read_at = (await (await client.get(f"/tasks/{read}")).json())["delivery"]["read_at"]

    page, problems = await open_dashboard(browser, client)
    await page.locator(f'#recent tr[data-task-id="{scheduled}"]').wait_for()

    def cell(task_id: str) -> Any:
        return page.locator(f'#recent tr[data-task-id="{task_id}"] td.delivery')

    assert await page.locator("table:has(#recent) thead th").nth(6).text_content() == "Delivery"
    assert await cell(delivered).inner_text() == "delivered"
    assert await cell(read).inner_text() == "read"
    assert await cell(waiting).inner_text() == "accepted"
    assert await cell(evo).inner_text() == "no receipts"
    assert await cell(evo).get_attribute("title") == "no receipts on this instance"
    assert await cell(scheduled).inner_text() == ""  # nothing before a send
    title = await cell(read).get_attribute("title") or ""
    expected = await page.evaluate("at => new Date(at).toLocaleString()", read_at)
    assert title == "read " + expected  # its time on hover

    last_hour = page.locator("#chart g.bar").last
    counts = {
        step: await last_hour.locator(f"rect.{step}").get_attribute("data-count")
        for step in ("sent", "delivered", "read")
    }
    assert counts == {"sent": "4", "delivered": "2", "read": "1"}
    assert await last_hour.locator("rect.failed").count() == 0
    heights = [
        float(await last_hour.locator(f"rect.{step}").get_attribute("height") or 0)
        for step in ("sent", "delivered", "read")
    ]
    assert heights[0] > heights[1] > heights[2] > 0
    legend = await page.locator(".legend").inner_text()
    assert [w.strip() for w in legend.split()] == [
        "Sent",
        "Delivered",
        "Read",
        "Delivery",
        "failed",
    ]
    assert (
        "4 sent, 2 delivered, 1 read, 0 failed" in await page.locator("#chart-summary").inner_text()
    )
    await page.screenshot(path=str(tmp_path / "funnel.png"), full_page=True)
    if os.environ.get("EVOMSGD_FUNNEL_SCREENSHOT"):
        await page.screenshot(path=os.environ["EVOMSGD_FUNNEL_SCREENSHOT"], full_page=True)
    assert problems == []


async def test_the_instances_panel_shows_budgets_and_when_quiet_hours_end(
    make_client: MakeClient, fake: FakeEvolution, browser: Any, tmp_path: Path
) -> None:
    # Quiet hours from an hour ago to an hour from now in Mexico City: night there whenever the
    # test runs, day in Sao Paulo (three hours ahead, outside the window).
    zone = ZoneInfo("America/Mexico_City")
    local = datetime.now(zone)
    window = f"{local - timedelta(hours=1):%H:%M}-{local + timedelta(hours=1):%H:%M}"
    main = {
        "warmup_days": 3,
        "warmup_start": 2,
        "new_contacts_per_day": 2,
        "quiet_hours": window,
    }
    client = await make_client(
        fast_settings(evolution_url=fake.url, instances={"main": main, "other": {"per_day": 1}})
    )
    sent = await post(client, phone="+5511988887777")
    await wait_status(client, sent["task_id"], {"SUCCESS"})
    await post(client, phone="+525512345678", expires_in=7200)  # held until the window ends
    lane = await lane_when(client, "main", lambda lane: lane["quiet_held"] == 1)
    until = datetime.fromisoformat(lane["quiet_ends"][0]["until"]).astimezone(zone)
    other = await post(client, phone="+5511988887777", instance_name="other")
    await wait_status(client, other["task_id"], {"SUCCESS"})

    page, problems = await open_dashboard(browser, client)
    cell = page.locator('#lanes tr[data-budgets="main"] .lane-budgets')
    await cell.wait_for()
    lines = await cell.locator(".budget").all_inner_texts()
    assert lines == [
        "sent 1 of 2 · warm-up day 1 of 3",
        "new contacts 1 of 2",
        f"quiet hours {window}\n· 1 held until {until:%H:%M} America/Mexico_City",
    ]
    meters = cell.locator("meter")
    assert [await m.get_attribute("value") for m in await meters.all()] == ["1", "1"]
    assert await cell.locator(".budget-full").count() == 0
    quiet = cell.locator(".budget-quiet")
    title = await quiet.get_attribute("title") or ""
    assert title.splitlines()[1].startswith(f"1 until {until:%H:%M} in America/Mexico_City (")
    other_cell = page.locator('#lanes tr[data-budgets="other"] .lane-budgets')
    assert await other_cell.locator(".budget").all_inner_texts() == ["sent 1 of 1 (used up)"]
    used_up = other_cell.locator(".budget-full span")  # a used-up budget stands out
    assert await used_up.evaluate("span => getComputedStyle(span).fontWeight") == "600"
    await page.screenshot(path=str(tmp_path / "budgets.png"))
    assert problems == []


async def test_the_dashboard_shows_media_with_a_thumbnail_and_a_download(
    make_client: MakeClient, fake: FakeEvolution, browser: Any, tmp_path: Path
) -> None:
    """Issue 16: type, file name and size; an image's thumbnail and every file's download come
    from the daemon itself, fetched with the page's token (tokens on: no token, no file)."""
    client = await make_client(fast_settings(evolution_url=fake.url))
    token = add_token(tmp_path, "ops")
    await wait_for_status(client, "/tasks", 401, {})
    auth = {"Authorization": f"Bearer {token}"}

    async def send(media: dict[str, Any]) -> str:
        resp = await client.post(
            "/messages", json={"phone": "+5511900000001", "media": media}, headers=auth
        )
        assert resp.status == 202, await resp.json()
        task_id: str = (await resp.json())["task_id"]
        return task_id

    image = await send({"type": "image", "base64": b64(PNG), "filename": "parcel.png"})
    document = await send({"type": "document", "base64": b64(PDF), "filename": "invoice-1042.pdf"})
    context = await browser.new_context(accept_downloads=True)
    await context.add_init_script(f"window.localStorage.setItem('evomsgd_token', '{token}')")
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    fetched: list[tuple[str, str | None]] = []
    page.on(
        "request",
        lambda req: (
            fetched.append((req.url, req.headers.get("authorization")))
            if "/media" in req.url
            else None
        ),
    )
    await page.goto(str(client.make_url("/dashboard")))

    await page.locator(f'#recent tr[data-task-id="{image}"]').click()
    details = page.locator(f'#recent tr[data-details-for="{image}"] .media')
    await details.wait_for()
    assert await details.locator(".media-facts").inner_text() == (
        f"image · parcel.png · {len(PNG)} bytes"
    )
    thumb = details.locator("img.media-thumb")
    await thumb.wait_for()
    await page.wait_for_function(
        "img => img.complete && img.naturalWidth === 2 && img.src.startsWith('blob:')",
        arg=await thumb.element_handle(),
    )

    await page.locator(f'#recent tr[data-task-id="{document}"]').click()
    button = page.locator(
        f'#recent tr[data-details-for="{document}"] button[data-action="download"]'
    )
    async with page.expect_download() as info:
        await button.click()
    download = await info.value
    assert download.suggested_filename == "invoice-1042.pdf"
    assert Path(await download.path()).read_bytes() == PDF
    assert await page.locator(f'#recent tr[data-details-for="{document}"] img').count() == 0

    base = str(client.make_url("/"))
    assert sorted(fetched) == sorted(
        [(f"{base}tasks/{image}/media", f"Bearer {token}"),
         (f"{base}tasks/{document}/media", f"Bearer {token}")]
    )  # fmt: skip
    assert problems == []
    await context.close()
