"""Issue #6 through the real app: tokens, browser rules, limits. Real processes: test_security_e2e."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from evomsgd.ledger import tokens
from evomsgd.ledger.records import TokenRow
from evomsgd.ledger.store import Store
from evomsgd.models import ErrorBody
from evomsgd.web import guards
from tests.conftest import FOREIGN, JSON, MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault

BODY = {"phone": "+5511988887777", "message": "Your code is 123456"}
PROTECTED = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/tasks"),
    ("GET", "/tasks/0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11"),
    ("GET", "/instances"),
    ("GET", "/stats/hourly"),
    ("POST", "/messages"),
    ("DELETE", "/tasks/0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11"),
    ("POST", "/tasks/0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11/retry"),
    ("POST", "/instances/main/pause"),
    ("POST", "/instances/main/resume"),
]
PUBLIC = [
    "/",
    "/openapi.json",
    "/docs",
    "/docs/init.js",
    "/dashboard",
    "/dashboard/static/dashboard.js",
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **JSON}


def add_token(data_dir: Path, name: str, *instances: str) -> str:
    """What `evomsgd token create` does: its own connection to the ledger file."""
    store = Store(data_dir)
    try:
        return tokens.create(store, name, instances)
    finally:
        store.close()


def count_messages(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "evomsgd.db") as conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


async def wait_for_status(
    client: TestClient[Any, Any], path: str, status: int, headers: dict[str, str]
) -> None:
    """The daemon re-reads the tokens table within tokens.CACHE_TTL; poll until it has."""
    deadline = time.monotonic() + 5
    while (await client.get(path, headers=headers)).status != status:
        assert time.monotonic() < deadline, f"GET {path} never answered {status}"
        await asyncio.sleep(0.05)


async def assert_error(resp: Any, status: int, code: str, message: str | None = None) -> None:
    data = await resp.json()
    assert resp.status == status, data
    ErrorBody.model_validate(data)
    assert data["error"]["code"] == code
    if message is not None:
        assert data["error"]["message"] == message


@pytest.fixture
async def secured(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> tuple[TestClient[Any, Any], str]:
    """The app with one token; returns the client and that token."""
    client = await make_client(fast_settings(evolution_url=fake.url))
    token = add_token(tmp_path, "backend")
    await wait_for_status(client, "/tasks", 401, {})
    return client, token


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_random_and_only_their_hash_is_stored(tmp_path: Path) -> None:
    first, second = add_token(tmp_path, "a"), add_token(tmp_path, "b", "shop", "shop", "main")
    assert first != second and first.startswith("evm_") and len(first) >= 4 + 43
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("evomsgd.db*"))
    assert first.encode() not in raw and second.encode() not in raw
    store = Store(tmp_path)
    try:
        rows = store.tokens()
        assert [(r.name, r.instances) for r in rows] == [("a", ()), ("b", ("main", "shop"))]
        assert rows[0].sha256 == tokens.digest(first)
        assert tokens.match(rows, second) == rows[1]
        assert tokens.match(rows, second + "x") is None
        with pytest.raises(tokens.TokenError) as taken:
            tokens.create(store, "a")
        assert str(taken.value) == (
            "a token named 'a' already exists - revoke it first (`evomsgd token revoke a`) "
            "or pick another name"
        )
        with pytest.raises(tokens.TokenError) as bad:
            tokens.create(store, "no spaces")
        assert "token name 'no spaces' is not allowed" in str(bad.value)
        with pytest.raises(tokens.TokenError) as unknown:
            tokens.revoke(store, "zzz")
        assert str(unknown.value) == "no token named 'zzz' - see `evomsgd token list`"
    finally:
        store.close()


async def test_once_a_token_exists_every_api_route_needs_it(
    secured: tuple[TestClient[Any, Any], str],
) -> None:
    client, token = secured
    for method, path in PROTECTED:
        resp = await client.request(method, path, headers=JSON)
        await assert_error(resp, 401, "unauthorized", guards.NO_TOKEN)
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="evomsgd"'
        wrong = await client.request(method, path, headers=bearer(token[:-1] + "x"))
        await assert_error(wrong, 401, "unauthorized", guards.BAD_TOKEN)
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        basic = await client.request(
            method, path, headers={"Authorization": "Basic " + token, **JSON}
        )
        assert basic.status == 401
        ok = await client.request(method, path, headers=bearer(token))
        assert ok.status not in (401, 403), (method, path)
    for path in PUBLIC:
        assert (await client.get(path)).status == 200, path


async def test_a_valid_token_sends_and_is_recorded_with_the_message(
    secured: tuple[TestClient[Any, Any], str], tmp_path: Path
) -> None:
    client, token = secured
    resp = await client.post("/messages", json=BODY, headers=bearer(token))
    assert resp.status == 202
    task_id = (await resp.json())["task_id"]
    with sqlite3.connect(tmp_path / "evomsgd.db") as conn:
        row = conn.execute("SELECT token_name FROM messages WHERE id = ?", (task_id,)).fetchone()
    assert row == ("backend",)


async def test_revoked_and_new_tokens_apply_without_a_restart(
    secured: tuple[TestClient[Any, Any], str], tmp_path: Path
) -> None:
    client, token = secured
    assert (await client.get("/tasks", headers=bearer(token))).status == 200
    store = Store(tmp_path)
    try:
        tokens.revoke(store, "backend")
        second = tokens.create(store, "second")
    finally:
        store.close()
    await wait_for_status(client, "/tasks", 401, bearer(token))
    assert (await client.get("/tasks", headers=bearer(second))).status == 200


async def two_tokens(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> tuple[TestClient[Any, Any], str, str]:
    """A client of an app with an unscoped token "ops" and "shop-app" scoped to main."""
    client = await make_client(fast_settings(evolution_url=fake.url))
    full = add_token(tmp_path, "ops")
    shop = add_token(tmp_path, "shop-app", "main")
    await wait_for_status(client, "/tasks", 401, {})
    return client, full, shop


async def test_a_token_scoped_to_an_instance_cannot_use_others(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    client, full, shop = await two_tokens(make_client, fake, tmp_path)
    other = await client.post(
        "/messages", json={**BODY, "instance_name": "other"}, headers=bearer(full)
    )
    assert other.status == 202
    other_id = (await other.json())["task_id"]
    refused = await client.post(
        "/messages", json={**BODY, "instance_name": "other"}, headers=bearer(shop)
    )
    await assert_error(
        refused,
        403,
        "forbidden_instance",
        "token 'shop-app' may use only main, not 'other' - use a token made for 'other'",
    )
    # The default instance (main) is in its scope.
    assert (await client.post("/messages", json=BODY, headers=bearer(shop))).status == 202
    for method, path in [
        ("POST", "/instances/other/pause"),
        ("POST", "/instances/other/resume"),
        ("GET", f"/tasks/{other_id}"),
        ("DELETE", f"/tasks/{other_id}"),
        ("POST", f"/tasks/{other_id}/retry"),
    ]:
        resp = await client.request(method, path, headers=bearer(shop))
        await assert_error(resp, 403, "forbidden_instance")
    assert (await client.post("/instances/main/pause", headers=bearer(shop))).status == 200
    assert count_messages(tmp_path) == 2


async def test_a_scoped_token_sees_only_its_instances(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    """Phone numbers and errors of one tenant's instance are not another tenant's to read."""
    client, full, shop = await two_tokens(make_client, fake, tmp_path)
    fake.add_instance("other")
    fake.script([Fault.NOT_ON_WHATSAPP], number="5511977776666")  # a failure, on "other" only
    mine = await client.post("/messages", json=BODY, headers=bearer(full))
    theirs = await client.post(
        "/messages",
        json={"phone": "+5511977776666", "message": "hi", "instance_name": "other"},
        headers=bearer(full),
    )
    client.session.headers["Authorization"] = f"Bearer {full}"
    for resp in (mine, theirs):
        await wait_status(client, (await resp.json())["task_id"])
    del client.session.headers["Authorization"]

    async def seen(path: str, token: str) -> Any:
        resp = await client.get(path, headers=bearer(token))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    assert {t["instance"] for t in (await seen("/tasks", full))["tasks"]} == {"main", "other"}
    assert {t["instance"] for t in (await seen("/tasks", shop))["tasks"]} == {"main"}
    assert {t["instance"] for t in (await seen("/tasks?instance=main", shop))["tasks"]} == {"main"}
    refused = await client.get("/tasks?instance=other", headers=bearer(shop))
    await assert_error(refused, 403, "forbidden_instance")
    assert {i["instance"] for i in (await seen("/instances", full))["instances"]} >= {
        "main",
        "other",
    }
    assert [i["instance"] for i in (await seen("/instances", shop))["instances"]] == ["main"]
    health = await seen("/health", shop)
    assert [i["instance"] for i in health["instances"]] == ["main"]
    assert (await seen("/health", full))["last_error"]["instance"] == "other"
    assert health["last_error"] is None


# -- browsers -------------------------------------------------------------------------------


async def test_a_cross_site_form_post_queues_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """What an <form action="http://127.0.0.1:8001/messages" method="post"> on any site sends."""
    form = "phone=%2B5511988887777&message=hi&instance_name=main"
    attempts = [
        {"Content-Type": "application/x-www-form-urlencoded", **FOREIGN},
        {"Content-Type": "application/x-www-form-urlencoded"},  # Referrer-Policy hid the Origin
        {"Content-Type": "text/plain", "Origin": "null"},  # a sandboxed iframe
        {"Content-Type": "multipart/form-data; boundary=x", "User-Agent": OLD_BROWSER},
    ]
    for headers in attempts:
        resp = await client.post("/messages", data=form, headers=headers)
        assert resp.status in (403, 415), headers
        ErrorBody.model_validate(await resp.json())
    resp = await client.post(
        "/messages", data=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    await assert_error(
        resp,
        415,
        "unsupported_media_type",
        "POST needs the header Content-Type: application/json, even without a body (got "
        "application/x-www-form-urlencoded) - it is what keeps web pages from posting forms "
        "to evomsgd",
    )
    assert count_messages(tmp_path) == 0


# What browsers say they are, which no page can change: old ones send no Origin on a form POST.
OLD_BROWSER = "Mozilla/5.0 (Windows NT 6.1; rv:60.0) Gecko/20100101 Firefox/60.0"
MODERN_BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"

PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


def pdf_form() -> aiohttp.FormData:
    """What <form enctype="multipart/form-data"> with a file input posts (issue 16)."""
    form = aiohttp.FormData()
    form.add_field("phone", "+5511988887777")
    form.add_field("message", "hi")
    form.add_field("file", PDF, filename="invoice.pdf", content_type="application/pdf")
    return form


async def test_a_cross_site_multipart_form_queues_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """A multipart POST from a browser needs a token (an Authorization header no form can set)
    or a page of an allowed origin: a form from any other site, or from a browser that hides
    its Origin, stores no file and queues nothing. A client that is no browser (curl -F) may."""
    for headers, status, code in (
        (FOREIGN, 403, "forbidden_origin"),
        ({"Origin": "null"}, 403, "forbidden_origin"),  # a sandboxed iframe, no-referrer
        ({"User-Agent": OLD_BROWSER}, 403, "forbidden_form"),  # sends no Origin
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, 403, "forbidden_form"),
        ({"Sec-Fetch-Mode": "navigate", "User-Agent": "curl/8.5.0"}, 403, "forbidden_form"),
    ):
        resp = await client.post("/messages", data=pdf_form(), headers=headers)
        await assert_error(resp, status, code)
    resp = await client.post("/messages", data=pdf_form(), headers={"User-Agent": MODERN_BROWSER})
    await assert_error(
        resp,
        403,
        "forbidden_form",
        "a multipart POST from a browser needs Authorization: Bearer <token> (any token when "
        "evomsgd has none), or to come from a page on an origin in EVOMSGD_CORS_ORIGINS - it is "
        "what keeps web pages from posting forms to evomsgd",
    )
    assert count_messages(tmp_path) == 0
    assert not (tmp_path / "media").exists() or not list((tmp_path / "media").glob("??/*"))
    # The daemon's own pages (same origin), API clients with a header, and clients that are no
    # browser may: what `curl -F file=@invoice.pdf -F phone=... localhost:8001/messages` sends.
    same = await client.post(
        "/messages",
        data=pdf_form(),
        headers={"Origin": f"http://{client.host}:{client.port}", "User-Agent": MODERN_BROWSER},
    )
    assert same.status == 202, await same.json()
    bearer = await client.post("/messages", data=pdf_form(), headers={"Authorization": "Bearer x"})
    assert bearer.status == 202
    curl = await client.post("/messages", data=pdf_form(), headers={"User-Agent": "curl/8.5.0"})
    assert curl.status == 202, await curl.json()
    assert count_messages(tmp_path) == 3


async def test_a_multipart_post_with_tokens_needs_a_valid_one(
    secured: tuple[TestClient[Any, Any], str], tmp_path: Path
) -> None:
    client, token = secured
    for headers, status in (
        ({"User-Agent": OLD_BROWSER}, 403),  # a form
        ({}, 401),  # curl without its token
        ({"Authorization": "Bearer evm_wrong"}, 401),
    ):
        resp = await client.post("/messages", data=pdf_form(), headers=headers)
        assert resp.status == status, await resp.json()
    assert count_messages(tmp_path) == 0
    ok = await client.post(
        "/messages", data=pdf_form(), headers={"Authorization": f"Bearer {token}"}
    )
    assert ok.status == 202, await ok.json()


async def test_a_plain_delete_cancels_and_a_bodiless_post_still_needs_json(
    client: TestClient[Any, Any],
) -> None:
    """`curl -X DELETE .../tasks/ID`: no body, no Content-Type. Only POST can come from a form."""
    accepted = await post(client, send_at="2099-01-01T00:00:00Z")
    path = f"/tasks/{accepted['task_id']}"
    refused = await client.delete(
        path, headers=FOREIGN
    )  # a page can send it only after a preflight
    await assert_error(refused, 403, "forbidden_origin")
    assert (await (await client.get(path)).json())["status"] == "SCHEDULED"
    rebinding = await client.delete(path, headers={"Host": "evil.example:8001"})
    await assert_error(rebinding, 403, "forbidden_host")
    done = await client.delete(path)
    assert "Content-Type" not in done.request_info.headers
    assert done.status == 200, await done.text()
    assert (await done.json())["status"] == "CANCELED"
    for bodiless in (f"{path}/retry", "/instances/main/pause", "/instances/main/resume"):
        resp = await client.post(bodiless, skip_auto_headers={"Content-Type"})  # as curl sends it
        await assert_error(
            resp,
            415,
            "unsupported_media_type",
            "POST needs the header Content-Type: application/json, even without a body (got "
            "none) - it is what keeps web pages from posting forms to evomsgd",
        )
    assert (await (await client.get(path)).json())["status"] == "CANCELED"
    lanes = (await (await client.get("/instances")).json())["instances"]
    assert lanes and all(lane["paused_reason"] is None for lane in lanes)


async def test_a_foreign_origin_is_refused_and_the_same_origin_is_not(
    client: TestClient[Any, Any],
) -> None:
    accepted = await post(client, send_at="2099-01-01T00:00:00Z")
    for method, path in [
        ("POST", "/messages"),
        ("DELETE", f"/tasks/{accepted['task_id']}"),  # the dashboard's Cancel button
        ("POST", f"/tasks/{accepted['task_id']}/retry"),
        ("POST", "/instances/main/pause"),
    ]:
        resp = await client.request(method, path, json=BODY, headers=FOREIGN)
        await assert_error(
            resp,
            403,
            "forbidden_origin",
            "requests from web pages at https://evil.example are refused - add that origin "
            "to EVOMSGD_CORS_ORIGINS if it should call evomsgd",
        )
    same = f"http://{client.server.host}:{client.server.port}"
    resp = await client.post("/messages", json=BODY, headers={"Origin": same})
    assert resp.status == 202
    assert "Access-Control-Allow-Origin" not in resp.headers
    done = await client.delete(f"/tasks/{accepted['task_id']}", headers={"Origin": same, **JSON})
    assert done.status == 200


async def test_no_cors_headers_unless_the_origin_is_configured(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    closed = await make_client(fast_settings(evolution_url=fake.url))
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    resp = await closed.options("/messages", headers=preflight)
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    got = await closed.get("/tasks", headers={"Origin": "https://app.example"})
    assert got.status == 200 and not any(h.startswith("Access-Control") for h in got.headers)

    opened = await make_client(
        fast_settings(evolution_url=fake.url, cors_origins="https://App.example/,http://x:81")
    )
    resp = await opened.options("/messages", headers=preflight)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    sent = await opened.post("/messages", json=BODY, headers={"Origin": "https://app.example"})
    assert (
        sent.status == 202 and sent.headers["Access-Control-Allow-Origin"] == "https://app.example"
    )
    bad = await opened.post("/messages", json={}, headers={"Origin": "https://app.example"})
    assert bad.status == 422 and bad.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = await opened.options(
        "/messages", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.status == 405 and "Access-Control-Allow-Origin" not in other.headers


async def test_without_tokens_only_local_host_names_are_answered(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 makes its page 'same-origin'."""
    client = await make_client(fast_settings(evolution_url=fake.url))
    rebinding = {"Host": "evil.example:8001", "Origin": "http://evil.example:8001"}
    resp = await client.post("/messages", json=BODY, headers=rebinding)
    await assert_error(
        resp,
        403,
        "forbidden_host",
        "Host 'evil.example:8001' is refused: without API tokens evomsgd answers only requests "
        "for localhost or an IP address (this stops DNS-rebinding web pages) - create a token "
        "(`evomsgd token create NAME`) or list the site in EVOMSGD_CORS_ORIGINS",
    )
    for host in ("localhost:8001", "127.0.0.1:8001", "[::1]:8001", "192.0.2.7"):
        assert (await client.get("/tasks", headers={"Host": host})).status == 200, host
    assert count_messages(tmp_path) == 0


# -- limits ---------------------------------------------------------------------------------


async def test_message_text_over_the_configured_length_is_422(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, max_text_length=10))
    assert (await client.post("/messages", json={**BODY, "message": "x" * 10})).status == 202
    resp = await client.post("/messages", json={**BODY, "message": "é" * 11})
    await assert_error(
        resp,
        422,
        "validation_error",
        "message: is 11 characters; at most 10 are accepted (EVOMSGD_MAX_TEXT_LENGTH)",
    )


async def test_body_over_64_kib_is_413_before_it_is_read(client: TestClient[Any, Any]) -> None:
    text = "x" * (64 * 1024)
    resp = await client.post("/messages", json={**BODY, "message": text})
    await assert_error(resp, 413, "payload_too_large", "request body is too large")


async def test_huge_urls_and_headers_are_refused(client: TestClient[Any, Any]) -> None:
    many = {f"X-H{i}": "v" for i in range(80)}
    for path, headers in (
        ("/tasks?phone=" + "1" * 9000, None),
        ("/tasks", {"X-Big": "y" * 9000}),
        ("/tasks", many),
    ):
        resp = await client.get(path, headers=headers)
        assert resp.status == 400
        body = await resp.json()  # the one error shape, even from aiohttp's own parser
        ErrorBody.model_validate(body)
        assert body["error"]["code"] == "bad_request" and "8190 bytes" in body["error"]["message"]
    assert (await client.get("/tasks", headers={"X-Fine": "y" * 4000})).status == 200


async def raw_connection(client: TestClient[Any, Any]) -> tuple[Any, Any]:
    return await asyncio.open_connection(client.server.host, client.server.port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after `seconds`)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_idle_and_slow_connections_are_closed(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, idle_timeout=0.5))
    # Connects and says nothing.
    reader, writer = await raw_connection(client)
    assert await closed_within(reader, 5) == b""
    writer.close()
    # Sends headers one byte at a time, forever (slowloris).
    reader, writer = await raw_connection(client)

    async def drip() -> None:
        for byte in b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    dripping = asyncio.create_task(drip())
    try:
        assert await closed_within(reader, 5) == b""
    finally:
        dripping.cancel()
        writer.close()
    # Promises a body and never sends it.
    reader, writer = await raw_connection(client)
    writer.write(
        b"POST /messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"phone"'
    )
    answer = await closed_within(reader, 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"EVOMSGD_IDLE_TIMEOUT" in answer


def test_check_bind_refuses_public_addresses_without_tokens() -> None:
    from evomsgd.config import Settings
    from evomsgd.errors import ConfigError

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        guards.check_bind(Settings(sandbox=True, host=host), tokens=0)
    for host in ("0.0.0.0", "::", "192.0.2.7", "evomsgd.example.com", ""):
        with pytest.raises(ConfigError):
            guards.check_bind(Settings(sandbox=True, host=host), tokens=0)
        guards.check_bind(Settings(sandbox=True, host=host), tokens=1)
        guards.check_bind(Settings(sandbox=True, host=host, insecure_no_auth=True), tokens=0)


def test_token_rows_never_carry_the_token() -> None:
    # callback: whether it has its own callback endpoint (a flag; the secret is not in the row).
    assert set(TokenRow.__slots__) == {"name", "sha256", "instances", "created_at", "callback"}


async def test_secrets_are_not_in_error_bodies(
    secured: tuple[TestClient[Any, Any], str],
) -> None:
    client, token = secured
    for headers in (bearer(token + "x"), bearer(token)):
        for method, path in PROTECTED:
            text = await (await client.request(method, path, headers=headers)).text()
            assert token not in text and "evm_" not in text
    accepted = await client.post("/messages", json=BODY, headers=bearer(token))
    await wait_status_with(client, (await accepted.json())["task_id"], token)


async def wait_status_with(client: TestClient[Any, Any], task_id: str, token: str) -> None:
    client.session.headers["Authorization"] = f"Bearer {token}"
    done = await wait_status(client, task_id)
    assert token not in str(done)
