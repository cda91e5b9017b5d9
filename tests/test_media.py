"""Media through the real app (issue 16): JSON base64, multipart, URL and fetched URL; the bytes
stored before the 202; their checks (size, type) in the one error shape; delivery by sendMedia."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sqlite3
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from evomsgd.config import load_settings
from evomsgd.errors import ConfigError
from evomsgd.ledger.media import MEDIA_DIR
from evomsgd.models import ErrorBody
from tests.conftest import MakeClient, fast_settings, wait_status
from tests.fake_evolution import FakeEvolution, Fault
from tests.test_security import add_token, wait_for_status

PHONE = "+5511988887777"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< >>\n%%EOF\n"


def _png(width: int = 2, height: int = 2) -> bytes:
    """A real PNG (browsers decode it for the dashboard's thumbnail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x0f\x76\x6e" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = _png()
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56
# A tokenless daemon still wants proof that a multipart POST is not a web page's form.
BEARER = {"Authorization": "Bearer any"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def media_file(data_dir: Path, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return data_dir / MEDIA_DIR / digest[:2] / digest[2:]


def stored_files(data_dir: Path) -> list[Path]:
    root = data_dir / MEDIA_DIR
    return sorted(p for p in root.glob("??/*") if p.is_file()) if root.exists() else []


def media_row(data_dir: Path, task_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(data_dir / "evomsgd.db") as conn:
        row: tuple[Any, ...] = conn.execute(
            "SELECT media_type, media_sha256, media_size, media_mimetype, media_filename,"
            " media_url, text FROM messages WHERE id = ?",
            (task_id,),
        ).fetchone()
    return row


def count_messages(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "evomsgd.db") as conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


async def accepted(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    assert resp.status == 202, body
    task_id: str = body["task_id"]
    return task_id


async def assert_error(
    resp: aiohttp.ClientResponse, status: int, code: str, message: str, details: list[Any]
) -> None:
    data = await resp.json()
    assert resp.status == status, data
    ErrorBody.model_validate(data)
    assert data == {
        "success": False,
        "error": {"code": code, "message": message, "details": details},
    }


@pytest.fixture
async def small(make_client: MakeClient, fake: FakeEvolution) -> TestClient[Any, Any]:
    """A daemon that takes media of at most 1,000 bytes."""
    return await make_client(fast_settings(evolution_url=fake.url, max_media_bytes=1000))


# -- JSON base64 ------------------------------------------------------------------------------


async def test_a_base64_document_is_on_disk_at_the_202_and_goes_out_by_sendmedia(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path
) -> None:
    resp = await client.post(
        "/messages",
        json={
            "phone": PHONE,
            "message": "Your invoice",
            "media": {"type": "document", "base64": b64(PDF), "filename": "invoice-1042.pdf"},
        },
    )
    task_id = await accepted(resp)
    # At the 202 the file and the row that names it are both there.
    assert media_file(tmp_path, PDF).read_bytes() == PDF
    digest = hashlib.sha256(PDF).hexdigest()
    assert media_row(tmp_path, task_id) == (
        "document",
        digest,
        len(PDF),
        "application/pdf",
        "invoice-1042.pdf",
        None,
        "Your invoice",
    )
    done = await wait_status(client, task_id)
    assert done["status"] == "SUCCESS", done
    [sent] = fake.received
    assert sent.body == {
        "number": "5511988887777",
        "mediatype": "document",
        "mimetype": "application/pdf",
        "caption": "Your invoice",
        "media": b64(PDF),
        "fileName": "invoice-1042.pdf",
    }
    assert done["result"]["evolution_key"] == sent.key_id


async def test_identical_files_are_stored_once(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    body = {"phone": PHONE, "media": {"type": "image", "base64": b64(PNG)}}
    first = await accepted(await client.post("/messages", json=body))
    second = await accepted(await client.post("/messages", json=body))
    assert stored_files(tmp_path) == [media_file(tmp_path, PNG)]
    assert media_row(tmp_path, first)[1] == media_row(tmp_path, second)[1]


async def test_media_without_message_or_caption_is_sent_without_a_caption(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    """A null caption is Evolution's 400 (#2517); evomsgd leaves it out."""
    body = {"phone": PHONE, "media": {"type": "image", "base64": b64(PNG)}}
    task_id = await accepted(await client.post("/messages", json=body))
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert fake.received[0].body == {
        "number": "5511988887777",
        "mediatype": "image",
        "mimetype": "image/png",
        "media": b64(PNG),
        "fileName": "image.png",
    }


async def test_a_base64_document_without_a_filename_gets_one_from_its_type(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    body = {
        "phone": PHONE,
        "media": {"type": "document", "base64": b64(PDF), "caption": "Receipt"},
    }
    task_id = await accepted(await client.post("/messages", json=body))
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert fake.received[0].media == {
        "mediatype": "document",
        "mimetype": "application/pdf",
        "caption": "Receipt",
        "media": b64(PDF),
        "fileName": "document.pdf",
    }


async def test_a_file_over_the_limit_is_413_and_nothing_is_kept(
    small: TestClient[Any, Any], tmp_path: Path
) -> None:
    big = PDF + b"0" * 2000
    resp = await small.post(
        "/messages",
        json={"phone": PHONE, "media": {"type": "document", "base64": b64(big)}},
    )
    await assert_error(
        resp,
        413,
        "media_too_large",
        f"media is {len(big)} bytes; at most 1000 are accepted (EVOMSGD_MAX_MEDIA_BYTES)",
        [],
    )
    assert count_messages(tmp_path) == 0 and stored_files(tmp_path) == []


async def test_the_text_limit_stays_for_bodies_without_a_file(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """Only a body that carries a file in base64 may pass 64 KiB."""
    for body in (
        {"phone": PHONE, "message": "x" * (70 * 1024)},
        {"phone": PHONE, "message": "hi", "padding": "x" * (70 * 1024)},
        {"phone": PHONE, "media": {"type": "document", "url": "https://x.example/a.pdf"},
         "padding": "x" * (70 * 1024)},
    ):  # fmt: skip
        resp = await client.post("/messages", json=body)
        await assert_error(resp, 413, "payload_too_large", "request body is too large", [])
    assert count_messages(tmp_path) == 0


@pytest.mark.parametrize(
    ("media", "field", "message"),
    [
        (
            {"type": "document", "base64": b64(ELF), "filename": "invoice.pdf"},
            "media",
            "is a program (application/x-executable), not a document: evomsgd does not send "
            "executables",
        ),
        (
            {"type": "image", "base64": b64(PDF)},
            "media.type",
            "is image, but the bytes are application/pdf",
        ),
        (
            {"type": "image", "base64": b64(b"just some text, not a picture")},
            "media.type",
            "is image, but the bytes are of no format evomsgd recognises",
        ),
        (
            {"type": "document", "base64": b64(b"plain text"), "filename": "invoice.pdf"},
            "media.filename",
            "says application/pdf, but the bytes are not in that format",
        ),
        (
            {"type": "document", "base64": b64(PNG), "mimetype": "application/pdf"},
            "media.mimetype",
            "says application/pdf, but the bytes are image/png",
        ),
        (
            {"type": "document", "base64": "data:application/pdf;base64," + b64(PDF)},
            "media.base64",
            "is not standard base64 (A-Z a-z 0-9 + /, = padding, no data: prefix, no line breaks)",
        ),
        (
            {"type": "document", "base64": b64(PDF)[:8] + "AA==" + b64(PDF)[8:]},
            "media.base64",
            "is not standard base64 (A-Z a-z 0-9 + /, = padding, no data: prefix, no line breaks)",
        ),
        (
            {"type": "document"},
            "media",
            "needs exactly one of url or base64 (or a multipart file part), got none",
        ),
        (
            {"type": "document", "base64": b64(PDF), "url": "https://x.example/a.pdf"},
            "media",
            "needs exactly one of url or base64 (or a multipart file part), got url and base64",
        ),
        (
            {"type": "document", "url": "http://localhost:9000/invoice.pdf"},
            "media.url",
            "has the host 'localhost': Evolution downloads only from a dotted host name or an "
            "IP address - use one, or fetch: true to have evomsgd download it",
        ),
        (
            {"type": "document", "url": "ftp://files.example.com/invoice.pdf"},
            "media.url",
            "'ftp://files.example.com/invoice.pdf' must start with http:// or https://",
        ),
    ],
    ids=[
        "elf-as-pdf",
        "pdf-as-image",
        "text-as-image",
        "text-named-pdf",
        "png-said-pdf",
        "data-prefix",
        "padding-inside",
        "no-source",
        "two-sources",
        "localhost-url",
        "ftp-url",
    ],
)
async def test_media_that_is_not_what_it_says_is_422_and_nothing_is_kept(
    client: TestClient[Any, Any], tmp_path: Path, media: dict[str, Any], field: str, message: str
) -> None:
    resp = await client.post("/messages", json={"phone": PHONE, "message": "hi", "media": media})
    await assert_error(
        resp,
        422,
        "validation_error",
        f"{field}: {message}",
        [{"field": field, "message": message}],
    )
    assert count_messages(tmp_path) == 0 and stored_files(tmp_path) == []


async def test_message_is_still_required_without_media(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/messages", json={"phone": PHONE})
    await assert_error(
        resp,
        422,
        "validation_error",
        "message: Field required",
        [{"field": "message", "message": "Field required"}],
    )


async def test_the_idempotency_fingerprint_includes_the_file(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    def body(data: bytes) -> dict[str, Any]:
        return {"phone": PHONE, "media": {"type": "document", "base64": b64(data)}}

    key = {"Idempotency-Key": "invoice-1042"}
    first = await accepted(await client.post("/messages", json=body(PDF), headers=key))
    replay = await client.post("/messages", json=body(PDF), headers=key)
    assert replay.status == 200 and (await replay.json())["task_id"] == first
    other = await client.post("/messages", json=body(PDF + b"% another\n"), headers=key)
    assert other.status == 409
    assert count_messages(tmp_path) == 1


# -- delivery ---------------------------------------------------------------------------------


async def test_an_upload_failure_is_retried_and_a_validation_error_is_final(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    body = {"phone": PHONE, "media": {"type": "image", "base64": b64(PNG)}}
    fake.script(number="5511988887777", responses=[Fault.MEDIA_UPLOAD_FAILED, Fault.OK])
    retried = await accepted(await client.post("/messages", json=body))
    done = await wait_status(client, retried)
    assert done["status"] == "SUCCESS" and done["attempts"] == 2
    fake.script(number="5511988887777", responses=[Fault.MEDIA_NOT_URL_OR_BASE64])
    refused = await accepted(await client.post("/messages", json=body))
    failed = await wait_status(client, refused)
    assert failed["status"] == "FAILURE" and failed["attempts"] == 1
    assert "neither a URL it accepts nor base64" in failed["result"]["error"]


async def test_an_unpaired_instance_pauses_on_the_upload_error_and_sends_once_paired(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    fake.set_state("main", "close")
    body = {"phone": PHONE, "media": {"type": "image", "base64": b64(PNG)}}
    task_id = await accepted(await client.post("/messages", json=body))
    deadline = time.monotonic() + 10
    while not any(r.fault is Fault.MEDIA_NOT_PAIRED for r in fake.received):
        assert time.monotonic() < deadline, "the send never reached the fake"
        await asyncio.sleep(0.02)
    lanes = (await (await client.get("/instances")).json())["instances"]
    assert next(lane for lane in lanes if lane["instance"] == "main")["state"] == "close"
    fake.set_state("main", "open")
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"


async def test_sandbox_records_media_without_sending(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    client = await make_client(fast_settings(sandbox=True, default_instance=None))
    body = {"phone": PHONE, "media": {"type": "document", "base64": b64(PDF)}}
    task_id = await accepted(await client.post("/messages", json=body))
    done = await wait_status(client, task_id)
    assert done["status"] == "SUCCESS" and done["result"]["sandbox"] is True
    assert fake.received == [] and media_file(tmp_path, PDF).exists()


# -- URL --------------------------------------------------------------------------------------


async def test_url_media_goes_to_evolution_as_a_url_and_nothing_is_stored(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path
) -> None:
    url = "https://files.example.com/invoices/invoice-7.pdf"
    body = {"phone": PHONE, "message": "Invoice 7", "media": {"type": "document", "url": url}}
    task_id = await accepted(await client.post("/messages", json=body))
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert fake.received[0].media == {
        "mediatype": "document",
        "mimetype": "application/pdf",
        "caption": "Invoice 7",
        "media": url,
        "fileName": "invoice-7.pdf",
    }
    assert stored_files(tmp_path) == []
    assert media_row(tmp_path, task_id)[5] == url


# -- multipart --------------------------------------------------------------------------------


def form(data: bytes, filename: str = "invoice.pdf", **fields: str) -> aiohttp.FormData:
    body = aiohttp.FormData()
    for name, value in {"phone": PHONE, **fields}.items():
        body.add_field(name, value)
    body.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return body


async def test_a_multipart_upload_is_stored_and_sent(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path
) -> None:
    """What `curl -F file=@invoice.pdf -F phone=... -F message=...` sends."""
    resp = await client.post(
        "/messages", data=form(PDF, message="Your invoice", priority="high"), headers=BEARER
    )
    task_id = await accepted(resp)
    assert media_file(tmp_path, PDF).read_bytes() == PDF
    done = await wait_status(client, task_id)
    assert done["status"] == "SUCCESS" and done["priority"] == "high"
    assert fake.received[0].media == {
        "mediatype": "document",
        "mimetype": "application/pdf",
        "caption": "Your invoice",
        "media": b64(PDF),
        "fileName": "invoice.pdf",
    }


async def test_a_multipart_image_with_its_type_as_a_field(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    resp = await client.post(
        "/messages", data=form(PNG, "parcel", type="image", caption="Delivered"), headers=BEARER
    )
    assert (await wait_status(client, await accepted(resp)))["status"] == "SUCCESS"
    media = fake.received[0].media or {}
    assert (media["mediatype"], media["fileName"], media["caption"]) == (
        "image",
        "parcel.png",
        "Delivered",
    )


async def test_a_multipart_file_over_the_limit_is_413(
    small: TestClient[Any, Any], tmp_path: Path
) -> None:
    resp = await small.post("/messages", data=form(PDF + b"0" * 2000), headers=BEARER)
    await assert_error(
        resp,
        413,
        "media_too_large",
        "media is over 1000 bytes; at most 1000 are accepted (EVOMSGD_MAX_MEDIA_BYTES)",
        [],
    )
    assert count_messages(tmp_path) == 0 and stored_files(tmp_path) == []


async def test_a_multipart_executable_is_422(client: TestClient[Any, Any], tmp_path: Path) -> None:
    resp = await client.post("/messages", data=form(ELF, "invoice.pdf"), headers=BEARER)
    message = (
        "is a program (application/x-executable), not a document: evomsgd does not send executables"
    )
    await assert_error(
        resp, 422, "validation_error", f"media: {message}", [{"field": "media", "message": message}]
    )
    assert count_messages(tmp_path) == 0 and stored_files(tmp_path) == []


# -- fetch: a local HTTP server stands for the file host --------------------------------------


@pytest.fixture
async def files() -> AsyncIterator[str]:
    """A file host on 127.0.0.1: /files/invoice.pdf, /files/moved (a redirect), /files/big
    (chunked, no Content-Length), /other/invoice.pdf (outside the allowed prefix)."""

    async def invoice(request: web.Request) -> web.Response:
        return web.Response(body=PDF, content_type="application/pdf")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/files/invoice.pdf")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(PDF)
        for _ in range(40):
            await resp.write(b"0" * 100)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/files/invoice.pdf", invoice)
    app.router.add_get("/files/moved", moved)
    app.router.add_get("/files/big", big)
    app.router.add_get("/other/invoice.pdf", invoice)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_fetched_url_is_downloaded_stored_and_sent_as_base64(
    make_client: MakeClient, fake: FakeEvolution, files: str, tmp_path: Path
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, media_fetch_allowed=(f"{files}/files/",))
    )
    media = {"type": "document", "url": f"{files}/files/invoice.pdf", "fetch": True}
    task_id = await accepted(await client.post("/messages", json={"phone": PHONE, "media": media}))
    assert media_file(tmp_path, PDF).read_bytes() == PDF
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert fake.received[0].media == {
        "mediatype": "document",
        "mimetype": "application/pdf",
        "media": b64(PDF),
        "fileName": "invoice.pdf",
    }


async def test_fetching_obeys_the_allow_list_redirects_and_the_size_limit(
    make_client: MakeClient, fake: FakeEvolution, files: str, tmp_path: Path
) -> None:
    # EVOMSGD_MEDIA_FETCH=true: every url is fetched, no "fetch" in the request.
    client = await make_client(
        fast_settings(
            evolution_url=fake.url,
            media_fetch=True,
            media_fetch_allowed=(f"{files}/files/",),
            max_media_bytes=1000,
        )
    )

    async def send(path: str) -> aiohttp.ClientResponse:
        media = {"type": "document", "url": f"{files}{path}"}
        return await client.post("/messages", json={"phone": PHONE, "media": media})

    outside = f"{files}/other/invoice.pdf"
    message = f"{outside!r} is not allowed: it matches no prefix in EVOMSGD_MEDIA_FETCH_ALLOWED"
    await assert_error(
        await send("/other/invoice.pdf"),
        422,
        "validation_error",
        f"media.url: {message}",
        [{"field": "media.url", "message": message}],
    )
    moved = f"{files}/files/moved"
    message = f"{moved!r} answered HTTP 302 (a redirect to '/files/invoice.pdf', not followed)"
    await assert_error(
        await send("/files/moved"),
        422,
        "validation_error",
        f"media.url: {message}",
        [{"field": "media.url", "message": message}],
    )
    await assert_error(
        await send("/files/big"),
        413,
        "media_too_large",
        f"media: {files + '/files/big'!r} is over 1000 bytes; at most 1000 bytes are accepted "
        "(EVOMSGD_MAX_MEDIA_BYTES)",
        [],
    )
    assert count_messages(tmp_path) == 0 and stored_files(tmp_path) == []
    assert fake.received == []
    assert (await send("/files/invoice.pdf")).status == 202


# -- views ------------------------------------------------------------------------------------


async def test_a_task_shows_its_media_and_the_daemon_serves_the_stored_file(
    client: TestClient[Any, Any],
) -> None:
    body = {"phone": PHONE, "media": {"type": "image", "base64": b64(PNG), "filename": "parcel 77"}}
    task_id = await accepted(await client.post("/messages", json=body))
    view = await (await client.get(f"/tasks/{task_id}")).json()
    assert view["media"] == {
        "type": "image",
        "filename": "parcel 77.png",
        "mimetype": "image/png",
        "size": len(PNG),
        "sha256": hashlib.sha256(PNG).hexdigest(),
        "url": None,
        "download": f"/tasks/{task_id}/media",
    }
    resp = await client.get(view["media"]["download"])
    assert resp.status == 200 and await resp.read() == PNG
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Disposition"] == "attachment; filename*=UTF-8''parcel%2077.png"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in resp.headers["Content-Security-Policy"]
    listed = await (await client.get("/tasks")).json()
    assert listed["tasks"][0]["media"] == view["media"]


async def test_a_task_without_a_stored_file_has_no_download(
    client: TestClient[Any, Any],
) -> None:
    text = await accepted(await client.post("/messages", json={"phone": PHONE, "message": "hi"}))
    assert (await (await client.get(f"/tasks/{text}")).json())["media"] is None
    resp = await client.get(f"/tasks/{text}/media")
    await assert_error(resp, 404, "not_found", f"task {text} has no stored media file", [])
    url = "https://files.example.com/a.pdf"
    linked = await accepted(
        await client.post(
            "/messages", json={"phone": PHONE, "media": {"type": "document", "url": url}}
        )
    )
    media = (await (await client.get(f"/tasks/{linked}")).json())["media"]
    assert (media["url"], media["download"], media["size"]) == (url, None, None)
    assert (await client.get(f"/tasks/{linked}/media")).status == 404


async def test_the_download_is_behind_the_same_token(
    make_client: MakeClient, fake: FakeEvolution, tmp_path: Path
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url))
    token = add_token(tmp_path, "backend")
    await wait_for_status(client, "/tasks", 401, {})
    auth = {"Authorization": f"Bearer {token}"}
    body = {"phone": PHONE, "media": {"type": "document", "base64": b64(PDF)}}
    task_id = await accepted(await client.post("/messages", json=body, headers=auth))
    assert (await client.get(f"/tasks/{task_id}/media")).status == 401
    resp = await client.get(f"/tasks/{task_id}/media", headers=auth)
    assert resp.status == 200 and await resp.read() == PDF


async def test_an_ambiguous_media_send_is_looked_up_by_its_caption_not_sent_twice(
    client: TestClient[Any, Any], fake: FakeEvolution
) -> None:
    """The connection drops after Evolution took it: the look-up finds the caption among the
    recipient's messages, so the invoice is not sent a second time."""
    fake.script(number="5511988887777", responses=[Fault.DROP])
    body = {
        "phone": PHONE,
        "message": "Invoice 1042",
        "media": {"type": "document", "base64": b64(PDF)},
    }
    task_id = await accepted(await client.post("/messages", json=body))
    done = await wait_status(client, task_id)
    assert done["status"] == "SUCCESS", done
    assert [e["outcome"] for e in done["history"] if e["event"] == "attempt"] == [
        "ambiguous",
        "found",
    ]
    assert len(fake.received) == 1 and fake.lookups == 1


async def test_a_file_of_megabytes_passes_the_text_limit_in_base64(
    client: TestClient[Any, Any], fake: FakeEvolution, tmp_path: Path
) -> None:
    big = PDF + b"%" * (3 * 1024 * 1024)  # 4 MiB of base64: far past 64 KiB, under 16 MiB
    body = {"phone": PHONE, "media": {"type": "document", "base64": b64(big)}}
    task_id = await accepted(await client.post("/messages", json=body))
    assert media_file(tmp_path, big).stat().st_size == len(big)
    assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert base64.b64decode((fake.received[0].media or {})["media"]) == big


def test_a_fetch_prefix_that_is_no_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"EVOMSGD_MEDIA_FETCH_ALLOWED": "https://files.example.com/,ftp://x/"})
    assert str(refused.value).startswith("invalid configuration - EVOMSGD_MEDIA_FETCH_ALLOWED: ")
    assert "'ftp://x/' must start with http:// or https://" in str(refused.value)
    allowed = "  https://files.example.com/invoices/ , http://10.0.0.5:8080/app"
    assert load_settings(env={"EVOMSGD_MEDIA_FETCH_ALLOWED": allowed}).media_fetch_allowed == (
        "https://files.example.com/invoices/",
        "http://10.0.0.5:8080/app",
    )
