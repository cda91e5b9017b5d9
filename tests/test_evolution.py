"""EvolutionClient against a real fake Evolution server, row by row of the contract's table."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomsgd.evolution.client import (
    EvolutionClient,
    OutgoingMedia,
    SandboxClient,
    Sender,
    new_session,
)
from evomsgd.evolution.lookups import (
    LOOKUP_CLOCK_SKEW,
    StoredMessage,
    find_messages_body,
    found_outcome,
    match_sent,
    parse_messages,
    recipient_jid,
)
from evomsgd.evolution.outcomes import (
    DETAIL_LIMIT,
    EVOLUTION_CHANNEL,
    InstanceState,
    OutcomeKind,
    SendOutcome,
    ServerInfo,
    classify_exception,
    classify_response,
)
from tests.fake_evolution import DELIVERS, FakeEvolution, Fault, Reply

KEY = "sk-EVO-7f3a9c1e5b2d48f6a0c4"
NUMBER = "5511988887777"
TEXT = "Your code is 123456"
K = OutcomeKind


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as s:  # the daemon's pool: a connection can be reused
        yield s


@pytest.fixture
async def fake() -> AsyncIterator[FakeEvolution]:
    async with FakeEvolution(api_key=KEY, instances=["main"]) as f:
        yield f


@pytest.fixture
def client(session: aiohttp.ClientSession, fake: FakeEvolution) -> EvolutionClient:
    return EvolutionClient(session, fake.url, KEY, timeout=5.0)


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_no_key(*things: object) -> None:
    for thing in things:
        assert KEY not in repr(thing) and KEY not in str(thing)


# --- every row of the error table, forced through the fake ---------------------------------

ROWS = [
    (Fault.OK, K.SENT, "handed to WhatsApp"),
    (Fault.OK_MINIMAL, K.SENT, "handed to WhatsApp"),
    (Fault.OK_NO_KEY, K.AMBIGUOUS, "without a message id"),
    (Fault.UNAUTHORIZED, K.CONFIG_ERROR, "check EVOLUTION_API_KEY"),
    (Fault.UNKNOWN_INSTANCE, K.UNKNOWN_INSTANCE, "no such instance"),
    (Fault.WRONG_PATH, K.CONFIG_ERROR, "no such route"),
    (Fault.LICENSE, K.CONFIG_ERROR, "LICENSE_REQUIRED"),
    (Fault.CORS, K.CONFIG_ERROR, "CORS"),
    (Fault.SCHEMA, K.PERMANENT, "schema validation"),
    (Fault.V1_SCHEMA, K.CONFIG_ERROR, "set the API version to 1"),
    (Fault.BLANK_TEXT, K.PERMANENT, "blank text"),
    (Fault.MALFORMED_JSON, K.PERMANENT, "malformed JSON"),
    (Fault.NOT_ON_WHATSAPP, K.PERMANENT, "not on WhatsApp"),
    (Fault.CONNECTION_CLOSED, K.TRANSIENT, "connection trouble while sending"),
    (Fault.TIMED_OUT, K.TRANSIENT, "connection trouble while sending"),
    (Fault.SESSION_ERROR, K.TRANSIENT, "connection trouble while sending"),
    (Fault.RATE_LIMIT, K.RATE_LIMITED, "rate limit"),
    (Fault.PRISMA, K.SENT_UNCONFIRMED, "do not resend"),
    (Fault.NOT_PAIRED, K.UPSTREAM_DOWN, "not connected to WhatsApp"),
    (Fault.LOADING, K.TRANSIENT, "still loading"),
    (Fault.CONNECTION_CLOSED_500, K.TRANSIENT, "number check"),
    (Fault.TIMED_OUT_500, K.TRANSIENT, "number check"),
    (Fault.SERVER_ERROR, K.TRANSIENT, "server error (500)"),
    (Fault.BAD_GATEWAY, K.AMBIGUOUS, "proxy in front of Evolution answered 502"),
    (Fault.UNAVAILABLE, K.TRANSIENT, "server error (503)"),
    (Fault.GATEWAY_TIMEOUT, K.AMBIGUOUS, "proxy in front of Evolution answered 504"),
    (Fault.DROP, K.AMBIGUOUS, "closed the connection without answering"),
]


ROWS_FAULTS = [row[0] for row in ROWS]


# sendMedia's rows (shared/evolution-api.md, Send media): forced through send_media.
MEDIA_ROWS = [
    (Fault.MEDIA_SCHEMA, K.PERMANENT, "schema validation"),
    (Fault.V1_MEDIA_SCHEMA, K.CONFIG_ERROR, "set the API version to 1"),
    (Fault.MEDIA_NULL_CAPTION, K.PERMANENT, "schema validation"),
    (Fault.V1_EMPTY_CAPTION, K.PERMANENT, "schema validation"),
    (Fault.MEDIA_NOT_URL_OR_BASE64, K.PERMANENT, "neither a URL it accepts nor base64"),
    (Fault.MEDIA_NO_FILENAME, K.PERMANENT, "without a file name"),
    (Fault.MEDIA_UPLOAD_FAILED, K.TRANSIENT, "uploading the media to WhatsApp failed"),
    (Fault.MEDIA_NOT_PAIRED, K.UPSTREAM_DOWN, "not connected to WhatsApp"),
]
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


def _document(**overrides: Any) -> OutgoingMedia:
    fields: dict[str, Any] = {
        "kind": "document",
        "media": base64.b64encode(PDF).decode(),
        "filename": "invoice-1042.pdf",
        "mimetype": "application/pdf",
        "caption": "Your invoice",
    }
    return OutgoingMedia(**{**fields, **overrides})


def test_every_fault_has_a_row() -> None:
    assert {row[0] for row in ROWS + MEDIA_ROWS} | {Fault.HANG} == set(Fault)


@pytest.mark.parametrize(
    ("fault", "kind", "words"), MEDIA_ROWS, ids=[r[0].value for r in MEDIA_ROWS]
)
async def test_media_error_row(
    fake: FakeEvolution, client: EvolutionClient, fault: Fault, kind: OutcomeKind, words: str
) -> None:
    fake.script(number=NUMBER, responses=[fault])
    outcome = await client.send_media("main", NUMBER, _document())
    assert outcome.kind is kind, outcome
    assert words in outcome.reason
    [record] = fake.received
    assert record.fault is fault and not record.delivered
    # An unpaired instance's upload failure says what its sendText would: the lane pauses.
    paused = InstanceState.CLOSE if fault is Fault.MEDIA_NOT_PAIRED else None
    assert outcome.instance_state is paused
    assert_no_key(outcome)


async def test_send_media_is_the_documented_v2_call(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    outcome = await client.send_media("main", NUMBER, _document())
    assert outcome.kind is K.SENT and outcome.key_id == fake.received[0].key_id
    [record] = fake.received
    assert record.body == {
        "number": NUMBER,
        "mediatype": "document",
        "mimetype": "application/pdf",
        "caption": "Your invoice",
        "media": base64.b64encode(PDF).decode(),
        "fileName": "invoice-1042.pdf",
    }
    assert record.fault is Fault.OK and record.headers["content-type"] == "application/json"


async def test_send_media_without_caption_leaves_it_out(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    """A null caption is Evolution's 400 (#2517): absent is what means none."""
    url = "https://files.example.com/p/photo.jpg"
    media = OutgoingMedia("image", url, "photo.jpg", "image/jpeg", "")
    assert (await client.send_media("main", NUMBER, media)).kind is K.SENT
    assert fake.received[0].body == {
        "number": NUMBER,
        "mediatype": "image",
        "mimetype": "image/jpeg",
        "media": url,
        "fileName": "photo.jpg",
    }


async def test_send_media_v1_is_the_documented_mediamessage_call(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeEvolution(api_key=KEY, instances=["main"], api_version=1) as fake:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0, api_version=1)
        outcome = await client.send_media("main", NUMBER, _document())
        assert outcome.kind is K.SENT, outcome
        assert fake.received[0].body == {
            "number": NUMBER,
            "options": {"delay": 0},
            "mediaMessage": {
                "mediatype": "document",
                "mimetype": "application/pdf",
                "caption": "Your invoice",
                "media": base64.b64encode(PDF).decode(),
                "fileName": "invoice-1042.pdf",
            },
        }
    # Against a v2 server the v1 body is a configuration error, not the message's fault.
    async with FakeEvolution(api_key=KEY, instances=["main"]) as fake2:
        v1_client = EvolutionClient(session, fake2.url, KEY, timeout=5.0, api_version=1)
        wrong = await v1_client.send_media("main", NUMBER, _document())
        assert wrong.kind is K.CONFIG_ERROR and "set the API version to 2" in wrong.reason
        assert fake2.received[0].fault is Fault.MEDIA_SCHEMA


async def test_v2_media_body_to_a_v1_server_is_a_config_error(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeEvolution(api_key=KEY, instances=["main"], api_version=1) as fake:
        client = EvolutionClient(session, fake.url, KEY, timeout=5.0)
        outcome = await client.send_media("main", NUMBER, _document())
        assert outcome.kind is K.CONFIG_ERROR and "set the API version to 1" in outcome.reason
        assert fake.received[0].fault is Fault.V1_MEDIA_SCHEMA


async def test_the_fake_holds_sendmedia_to_the_contract(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    """What the real server refuses unscripted: a localhost URL (not isURL), base64 with a
    data: prefix, a base64 document without a file name, and any upload while unpaired."""
    cases = [
        (_document(media="http://localhost/invoice.pdf"), Fault.MEDIA_NOT_URL_OR_BASE64),
        (_document(media="data:application/pdf;base64,JVBERi0="), Fault.MEDIA_NOT_URL_OR_BASE64),
        (_document(filename=""), Fault.MEDIA_NO_FILENAME),
    ]
    for media, fault in cases:
        await client.send_media("main", NUMBER, media)
        assert fake.received[-1].fault is fault, media
    fake.set_state("main", "close")
    outcome = await client.send_media("main", NUMBER, _document())
    assert fake.received[-1].fault is Fault.MEDIA_NOT_PAIRED
    assert outcome.instance_state is InstanceState.CLOSE


async def test_sandbox_records_media_without_sending() -> None:
    outcome = await SandboxClient().send_media("sandbox", NUMBER, _document())
    assert outcome.kind is K.SENT and (outcome.key_id or "").startswith("SANDBOX-")
    assert "characters" in repr(_document()) and base64.b64encode(PDF).decode() not in repr(
        _document()
    )


@pytest.mark.parametrize(("fault", "kind", "words"), ROWS, ids=[r[0].value for r in ROWS])
async def test_error_table_row(
    fake: FakeEvolution, client: EvolutionClient, fault: Fault, kind: OutcomeKind, words: str
) -> None:
    fake.script(number=NUMBER, responses=[fault])
    outcome = await client.send_text("main", NUMBER, "Your code is 123456")
    assert outcome.kind is kind, outcome
    assert words in outcome.reason
    [record] = fake.received
    assert record.fault is fault
    assert record.delivered == (fault in DELIVERS)
    assert outcome.http_status == record.status  # None when the fake never answered
    assert outcome.detail is None or len(outcome.detail) <= DETAIL_LIMIT
    assert (outcome.key_id is not None) == (kind is K.SENT)
    assert_no_key(outcome)


async def test_request_is_the_documented_v2_call(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    await client.send_text("main", "+55 (11) 98888-7777", "hello https://example.com")
    [record] = fake.received
    assert record.instance == "main"
    assert record.body == {
        "number": "+55 (11) 98888-7777",
        "text": "hello https://example.com",
        "linkPreview": False,
    }
    assert record.headers["apikey"] == KEY
    assert record.headers["content-type"].startswith("application/json")


async def test_instance_name_is_url_quoted(fake: FakeEvolution, client: EvolutionClient) -> None:
    fake.add_instance("loja ação?x=1#y")
    outcome = await client.send_text("loja ação?x=1#y", NUMBER, "hi")
    assert outcome.kind is K.SENT
    assert fake.received[0].instance == "loja ação?x=1#y"


# --- success parsing ---------------------------------------------------------------------------


async def test_sent_v2_full_body(fake: FakeEvolution, client: EvolutionClient) -> None:
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.SENT and outcome.http_status == 201
    assert outcome.key_id == fake.received[0].key_id
    assert outcome.key_id is not None and outcome.key_id.isupper()
    assert outcome.remote_jid == f"{NUMBER}@s.whatsapp.net"
    assert outcome.elapsed > 0


async def test_sent_evolution_integration_minimal_body(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    fake.add_instance("cloud", integration="EVOLUTION")
    outcome = await client.send_text("cloud", NUMBER, "hi")
    assert outcome.kind is K.SENT
    assert outcome.key_id == fake.received[0].key_id and len(outcome.key_id or "") == 36
    assert outcome.remote_jid == NUMBER  # the raw input comes back


async def test_sent_lenient_extra_fields() -> None:
    body: dict[str, Any] = {"key": {"id": "ABC", "remoteJid": "x@lid", "fromMe": True}}
    body |= {"extra": [1, 2], "status": None}
    outcome = classify_response(201, json.dumps(body).encode())
    assert (outcome.kind, outcome.key_id, outcome.remote_jid) == (K.SENT, "ABC", "x@lid")
    outcome = classify_response(201, b'{"key": {"id": "ABC", "remoteJid": 5}}')
    assert (outcome.kind, outcome.key_id, outcome.remote_jid) == (K.SENT, "ABC", None)


async def test_v1_client_against_v1_server(session: aiohttp.ClientSession) -> None:
    async with FakeEvolution(api_key=KEY, api_version=1) as fake:
        client = EvolutionClient(session, fake.url, KEY, api_version=1)
        outcome = await client.send_text("main", NUMBER, "hi")
        assert outcome.kind is K.SENT and outcome.key_id == fake.received[0].key_id
        assert fake.received[0].body == {
            "number": NUMBER,
            "textMessage": {"text": "hi"},
            "options": {"delay": 0, "linkPreview": False},
        }
        info = await client.server_info()
        assert (info.reachable, info.version, info.major) == (True, "1.8.2", 1)


async def test_v2_client_against_v1_server_is_a_config_error(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeEvolution(api_key=KEY, api_version=1) as fake:
        outcome = await EvolutionClient(session, fake.url, KEY).send_text("main", NUMBER, "hi")
    assert outcome.kind is K.CONFIG_ERROR and "set the API version to 1" in outcome.reason


async def test_v1_client_against_v2_server_is_a_config_error(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    client = EvolutionClient(session, fake.url, KEY, api_version=1)
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.CONFIG_ERROR and "set the API version to 2" in outcome.reason
    assert fake.received[0].fault is Fault.SCHEMA


# --- the fake's own checks, answered as the real server would -----------------------------


async def test_bad_key_is_config_error(session: aiohttp.ClientSession, fake: FakeEvolution) -> None:
    outcome = await EvolutionClient(session, fake.url, "wrong-key").send_text("main", NUMBER, "x")
    assert (outcome.kind, outcome.http_status) == (K.CONFIG_ERROR, 401)
    assert outcome.reason == "Evolution rejected the API key (401) - check EVOLUTION_API_KEY"
    assert not fake.delivered


async def test_instance_token_is_accepted_but_not_another_instances(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    fake.add_instance("a", token="token-a")
    fake.add_instance("b", token="token-b")
    client = EvolutionClient(session, fake.url, "token-a")
    assert (await client.send_text("a", NUMBER, "x")).kind is K.SENT
    assert (await client.send_text("b", NUMBER, "x")).kind is K.CONFIG_ERROR


async def test_unknown_instance_is_checked_before_the_key(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    for key in (KEY, "wrong-key"):
        client = EvolutionClient(session, fake.url, key)
        outcome = await client.send_text("nope", NUMBER, "x")
        assert (outcome.kind, outcome.http_status) == (K.UNKNOWN_INSTANCE, 404)
        assert outcome.detail == 'The "nope" instance does not exist'


async def test_wrong_base_path_is_config_error(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    client = EvolutionClient(session, fake.url + "/manager/", KEY)
    outcome = await client.send_text("main", NUMBER, "x")
    assert outcome.kind is K.CONFIG_ERROR
    assert outcome.detail == "Cannot POST /manager/message/sendText/main"


async def test_blank_text_and_unknown_number_are_permanent(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    fake.not_on_whatsapp.add("5511000000009")
    blank = await client.send_text("main", NUMBER, "   ")
    missing = await client.send_text("main", "+55 11 00000-0009", "hi")
    assert (blank.kind, blank.detail) == (K.PERMANENT, "Text is required")
    assert missing.kind is K.PERMANENT
    assert missing.reason == "+55 11 00000-0009 is not on WhatsApp (400)"


@pytest.mark.parametrize(
    ("state", "kind"), [("close", K.UPSTREAM_DOWN), ("connecting", K.TRANSIENT)]
)
async def test_send_to_unpaired_instance(
    fake: FakeEvolution, client: EvolutionClient, state: str, kind: OutcomeKind
) -> None:
    fake.set_state("main", state)
    assert (await client.send_text("main", NUMBER, "hi")).kind is kind


async def test_license_gate_on_every_route(fake: FakeEvolution, client: EvolutionClient) -> None:
    fake.license_required = True
    assert (await client.send_text("main", NUMBER, "hi")).kind is K.CONFIG_ERROR
    probe = await client.connection_state("main")
    assert probe.kind is K.CONFIG_ERROR and "LICENSE_REQUIRED" in probe.reason
    info = await client.server_info()
    assert not info.reachable and "LICENSE_REQUIRED" in info.reason


async def test_fake_validates_bodies_like_the_contract(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    url, headers = f"{fake.url}/message/sendText/main", {"apikey": KEY}

    async def post(data: bytes) -> tuple[int, Any]:
        async with session.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    status, body = await post(b'{"number": "1"}')
    assert (status, body["response"]["message"]) == (400, [['instance requires property "text"']])
    status, body = await post(b'{"number": "1", "text": ""}')
    assert (status, body["response"]["message"]) == (400, ["Text is required"])
    status, body = await post(b'{"number": "1", "text": }')
    assert (status, body["error"]) == (400, "Internal Server Error")
    assert isinstance(body["response"]["message"], str)
    async with session.post(f"{fake.url}/message/sendTxt/main", headers=headers) as resp:
        assert resp.status == 404
        assert (await resp.json())["response"]["message"] == ["Cannot POST /message/sendTxt/main"]
    assert [r.fault for r in fake.received] == [
        Fault.SCHEMA,
        Fault.BLANK_TEXT,
        Fault.MALFORMED_JSON,
    ]


# --- scripting, latency, down -----------------------------------------------------------------


async def test_scripts_per_number_then_global_then_natural(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    fake.script(number="+55 11 00000-0001", responses=[Fault.RATE_LIMIT, Fault.OK])
    fake.script(responses=["loading"])
    kinds = [
        (await client.send_text("main", "5511000000001", "a")).kind,
        (await client.send_text("main", "5511000000002", "b")).kind,
        (await client.send_text("main", "5511000000001", "c")).kind,
        (await client.send_text("main", "5511000000002", "d")).kind,
    ]
    assert kinds == [K.RATE_LIMITED, K.TRANSIENT, K.SENT, K.SENT]
    assert [r.text for r in fake.delivered] == ["c", "d"]


async def test_scripted_raw_reply_echoing_the_key_is_scrubbed(
    fake: FakeEvolution, client: EvolutionClient
) -> None:
    fake.script([Reply(400, {"response": {"message": [f"Error: bad header apikey={KEY}"]}})])
    fake.script([Reply(500, f"upstream said {KEY}".encode())])
    first = await client.send_text("main", NUMBER, "x")
    second = await client.send_text("main", NUMBER, "x")
    assert (first.kind, second.kind) == (K.TRANSIENT, K.TRANSIENT)
    assert first.detail == "Error: bad header apikey=<api key>"
    assert_no_key(first, second)


async def test_latency_is_measured(fake: FakeEvolution, client: EvolutionClient) -> None:
    fake.latency = 0.05
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.SENT and outcome.elapsed >= 0.05
    [record] = await fake.wait_for_sends(1)
    assert record.at > 0


async def test_down_then_up_on_the_same_port(fake: FakeEvolution, client: EvolutionClient) -> None:
    port = fake.port
    assert (await client.connection_state("main")).state is InstanceState.OPEN  # pools a conn
    await fake.go_down()
    assert fake.is_down
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.UPSTREAM_DOWN and "cannot connect" in outcome.reason
    probe = await client.connection_state("main")
    assert (probe.state, probe.kind) == (InstanceState.UNKNOWN, K.UPSTREAM_DOWN)
    assert not (await client.server_info()).reachable
    await fake.go_up()
    assert fake.port == port
    assert (await client.send_text("main", NUMBER, "hi")).kind is K.SENT
    assert len(fake.received) == 1


# --- network failures -------------------------------------------------------------------------


async def test_client_timeout_on_hang_is_ambiguous_and_was_delivered(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    client = EvolutionClient(session, fake.url, KEY, timeout=0.3)
    fake.script([Fault.HANG])
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.AMBIGUOUS and "no answer from Evolution after" in outcome.reason
    assert outcome.elapsed >= 0.3
    [record] = await fake.wait_for_arrivals(1)
    assert record.fault is Fault.HANG and record.delivered


async def test_hang_answers_after_release(fake: FakeEvolution, client: EvolutionClient) -> None:
    fake.script([Fault.HANG])
    task = asyncio.create_task(client.send_text("main", NUMBER, "hi"))
    await fake.wait_for_arrivals(1)
    assert not task.done()
    fake.release()
    assert (await task).kind is K.SENT


async def test_connection_refused_is_upstream_down(session: aiohttp.ClientSession) -> None:
    client = EvolutionClient(session, f"http://127.0.0.1:{free_port()}", KEY)
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.UPSTREAM_DOWN and outcome.http_status is None
    assert "ClientConnectorError" in (outcome.detail or "")
    assert_no_key(outcome)


async def test_unresolvable_host_is_upstream_down(session: aiohttp.ClientSession) -> None:
    client = EvolutionClient(session, "http://evolution.invalid", KEY, timeout=2.0)
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.UPSTREAM_DOWN


async def test_tls_to_a_plain_http_server_is_upstream_down(
    session: aiohttp.ClientSession, fake: FakeEvolution
) -> None:
    client = EvolutionClient(session, fake.url.replace("http:", "https:"), KEY)
    outcome = await client.send_text("main", NUMBER, "hi")
    assert outcome.kind is K.UPSTREAM_DOWN and "TLS" in outcome.reason
    assert not fake.received


@pytest.mark.parametrize(
    ("exc", "sent", "kind"),
    [
        (aiohttp.ServerDisconnectedError(), True, K.AMBIGUOUS),
        (aiohttp.ClientPayloadError("cut"), True, K.AMBIGUOUS),
        (aiohttp.SocketTimeoutError(), True, K.AMBIGUOUS),
        (TimeoutError(), True, K.AMBIGUOUS),
        (ConnectionResetError(), True, K.AMBIGUOUS),
        (TimeoutError(), False, K.UPSTREAM_DOWN),
        (aiohttp.ConnectionTimeoutError(), True, K.UPSTREAM_DOWN),  # by type: before sending
        (OSError("no route"), False, K.UPSTREAM_DOWN),
        (aiohttp.InvalidURL("x"), False, K.CONFIG_ERROR),
    ],
)
def test_classify_exception(exc: BaseException, sent: bool, kind: OutcomeKind) -> None:
    outcome = classify_exception(exc, sent=sent, elapsed=1.5)
    assert outcome.kind is kind and outcome.elapsed == 1.5 and outcome.http_status is None


# --- health probes ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["open", "connecting", "close"])
async def test_connection_state(fake: FakeEvolution, client: EvolutionClient, state: str) -> None:
    fake.set_state("main", state)
    probe = await client.connection_state("main")
    assert (probe.state, probe.kind) == (InstanceState(state), None)
    assert "main" in probe.reason
    assert fake.state_probes[0][1] == "main"


async def test_connection_state_failures(
    session: aiohttp.ClientSession, fake: FakeEvolution, client: EvolutionClient
) -> None:
    unknown = await client.connection_state("nope")
    bad_key = await EvolutionClient(session, fake.url, "wrong").connection_state("main")
    refused = await EvolutionClient(
        session, f"http://127.0.0.1:{free_port()}", KEY
    ).connection_state("main")
    assert (unknown.state, unknown.kind) == (InstanceState.UNKNOWN, K.UNKNOWN_INSTANCE)
    assert (bad_key.state, bad_key.kind) == (InstanceState.UNKNOWN, K.CONFIG_ERROR)
    assert (refused.state, refused.kind) == (InstanceState.UNKNOWN, K.UPSTREAM_DOWN)
    assert_no_key(unknown, bad_key, refused)


async def test_server_info(session: aiohttp.ClientSession, client: EvolutionClient) -> None:
    info = await client.server_info()
    assert info == ServerInfo(True, "2.3.7", "Evolution 2.3.7 is reachable")
    assert info.major == 2
    refused = EvolutionClient(session, f"http://127.0.0.1:{free_port()}", KEY)
    assert not (await refused.server_info()).reachable


# --- secrecy, construction, sandbox -----------------------------------------------------------


async def test_key_never_leaks(session: aiohttp.ClientSession, caplog: Any) -> None:
    caplog.set_level("DEBUG", logger="evomsgd.evolution")
    async with FakeEvolution(api_key=KEY) as fake:
        client = EvolutionClient(session, fake.url, KEY, timeout=0.5)
        fake.script([*ROWS_FAULTS, Fault.HANG])
        outcomes = [await client.send_text("main", NUMBER, TEXT) for _ in range(len(ROWS) + 1)]
        outcomes.append(await client.send_text("nope", NUMBER, "hi"))
        probes = [await client.connection_state(i) for i in ("main", "nope")]
        await fake.go_down()
        outcomes.append(await client.send_text("main", NUMBER, "hi"))
    assert_no_key(client, *outcomes, *probes, await client.server_info())
    assert "<hidden>" in repr(client)
    assert KEY not in caplog.text and TEXT not in caplog.text


def test_bad_construction_is_refused() -> None:
    session: Any = object()
    with pytest.raises(ValueError, match="http"):
        EvolutionClient(session, "evolution:8080", KEY)
    with pytest.raises(ValueError, match="1 or 2"):
        EvolutionClient(session, "http://e", KEY, api_version=3)
    client = EvolutionClient(session, "http://e:8080/prefix/?q=1", KEY)
    assert client.base_url == "http://e:8080/prefix"


async def test_sandbox_client() -> None:
    sandbox = SandboxClient()
    assert isinstance(sandbox, Sender)
    first = await sandbox.send_text("main", NUMBER, "hi")
    second = await sandbox.send_text("main", "123@g.us", "hi")
    assert first.kind is K.SENT and first.reason == "sandbox: not sent"
    assert first.key_id is not None and first.key_id.startswith("SANDBOX-")
    suffix = first.key_id.removeprefix("SANDBOX-")
    assert len(suffix) == 20 and suffix == suffix.upper() and int(suffix, 16) >= 0
    assert first.key_id != second.key_id
    assert (first.remote_jid, second.remote_jid) == (f"{NUMBER}@s.whatsapp.net", "123@g.us")
    probe = await sandbox.connection_state("x")
    assert (probe.state, probe.kind) == (InstanceState.OPEN, None)
    assert (await sandbox.server_info()).version == "sandbox"


def test_evolution_client_is_a_sender() -> None:
    session: Any = object()
    assert isinstance(EvolutionClient(session, "http://e", KEY), Sender)


# --- the fake as a separate process -----------------------------------------------------------


async def test_fake_runs_as_a_process(session: aiohttp.ClientSession) -> None:
    script = Path(__file__).with_name("fake_evolution.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--port=0",
        f"--api-key={KEY}",
        "--instances=a,b",
        "--state=b=close",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        word, port = line.decode().split()
        assert word == "READY"
        url = f"http://127.0.0.1:{port}"
        client = EvolutionClient(session, url, KEY)
        assert (await client.connection_state("b")).state is InstanceState.CLOSE
        async with session.post(f"{url}/_fake/script", json={"responses": ["rate_limit"]}):
            pass
        assert (await client.send_text("a", NUMBER, "x")).kind is K.RATE_LIMITED
        assert (await client.send_text("b", NUMBER, "x")).kind is K.UPSTREAM_DOWN
        async with session.get(f"{url}/_fake/received") as resp:
            received = await resp.json()
        assert [r["fault"] for r in received] == ["rate_limit", "not_paired"]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# --- properties of the pure classifier --------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
messages = st.one_of(
    st.text(),
    st.lists(st.text()),
    st.lists(st.lists(st.text())),
    st.lists(st.fixed_dictionaries({"jid": st.text(), "exists": st.booleans()})),
    json_values,
)
envelopes = st.builds(
    lambda status, error, message, extra: {
        "status": status,
        "error": error,
        "response": {"message": message},
        **extra,
    },
    json_values,
    st.one_of(st.text(), st.just("Internal Server Error"), json_values),
    messages,
    st.dictionaries(st.sampled_from(["code", "message", "key"]), json_values, max_size=2),
)
statuses = st.integers(min_value=-1, max_value=1000)


def _check(outcome: SendOutcome, status: int) -> None:
    assert isinstance(outcome.kind, OutcomeKind)
    assert outcome.http_status == status
    assert outcome.reason
    assert outcome.detail is None or len(outcome.detail) <= DETAIL_LIMIT
    assert (outcome.kind is K.SENT) == (outcome.key_id is not None)


@given(statuses, st.binary(max_size=512))
def test_classify_never_raises_on_bytes(status: int, body: bytes) -> None:
    _check(classify_response(status, body), status)


@given(statuses, st.one_of(envelopes, json_values))
def test_classify_never_raises_on_json(status: int, data: Any) -> None:
    _check(classify_response(status, json.dumps(data).encode()), status)


def test_classify_survives_deep_nesting_and_bad_utf8() -> None:
    for body in (b"[" * 100_000, b"\xff\xfe\x00bad", b'{"response": {"message": "\xff"}}'):
        _check(classify_response(400, body), 400)


@given(st.integers(200, 299).filter(lambda s: s != 201), st.one_of(envelopes, json_values))
def test_success_other_than_201_is_ambiguous(status: int, data: Any) -> None:
    assert classify_response(status, json.dumps(data).encode()).kind is K.AMBIGUOUS


@given(json_values)
def test_201_without_a_key_is_ambiguous(data: Any) -> None:
    if isinstance(data, dict):
        data.pop("key", None)
    assert classify_response(201, json.dumps(data).encode()).kind is K.AMBIGUOUS


@given(st.text().filter(str.strip), json_values)
def test_201_with_a_key_is_sent(key_id: str, extra: Any) -> None:
    body = {"key": {"id": key_id, "remoteJid": "1@s.whatsapp.net"}, "extra": extra}
    outcome = classify_response(201, json.dumps(body).encode())
    assert (outcome.kind, outcome.key_id) == (K.SENT, key_id.strip())


@given(st.one_of(envelopes, json_values))
def test_every_401_is_a_config_error(data: Any) -> None:
    assert classify_response(401, json.dumps(data).encode()).kind is K.CONFIG_ERROR


@given(st.one_of(envelopes, json_values))
def test_every_404_is_config_or_unknown_instance(data: Any) -> None:
    kind = classify_response(404, json.dumps(data).encode()).kind
    assert kind in (K.CONFIG_ERROR, K.UNKNOWN_INSTANCE)


@given(st.integers(500, 599), st.one_of(envelopes, json_values))
def test_5xx_is_never_a_success(status: int, data: Any) -> None:
    kind = classify_response(status, json.dumps(data).encode()).kind
    assert kind not in (K.SENT, K.SENT_UNCONFIRMED, K.PERMANENT)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Error: rate-overlimit", K.RATE_LIMITED),
        (["Error: rate-overlimit"], K.RATE_LIMITED),
        ([["Error: Connection Closed"]], K.TRANSIENT),
        ([{"jid": "1@s.whatsapp.net", "exists": False, "number": "1"}], K.PERMANENT),
        ([{"jid": "1@s.whatsapp.net", "exists": True}], K.PERMANENT),
        ("PrismaClientUnknownRequestError: ...", K.SENT_UNCONFIRMED),
        (["Error: something new from Baileys"], K.TRANSIENT),
        ("something else", K.PERMANENT),
    ],
)
def test_400_message_shapes(message: Any, kind: OutcomeKind) -> None:
    body = json.dumps({"status": 400, "error": "Bad Request", "response": {"message": message}})
    assert classify_response(400, body.encode()).kind is kind


def test_license_code_wins_over_status() -> None:
    body = json.dumps({"status": 503, "code": "LICENSE_REQUIRED", "message": "activate"})
    assert classify_response(503, body.encode()).kind is K.CONFIG_ERROR
    assert classify_response(503, b"<html>503</html>").kind is K.TRANSIENT


# --- looking a send up: findMessages -------------------------------------------------------


async def test_find_messages_answers_the_sends_evolution_stored_for_that_recipient(
    client: EvolutionClient, fake: FakeEvolution
) -> None:
    fake.script([Fault.DROP, Reply(502, "bad gateway", delivered=False), Fault.OK])
    await client.send_text("main", NUMBER, TEXT)  # delivered, no answer
    await client.send_text("main", NUMBER, "not delivered")
    await client.send_text("main", "5511900000000", TEXT)  # another recipient
    answer = await client.find_messages("main", recipient_jid(NUMBER))
    assert answer.ok
    assert answer.data == (
        StoredMessage(
            fake.delivered[0].key_id or "",
            f"{NUMBER}@s.whatsapp.net",
            True,
            TEXT,
            answer.data[0].at,
        ),
    )
    assert isinstance(answer.data[0].at, float)
    assert match_sent(answer.data, TEXT, answer.data[0].at) == answer.data


async def test_find_messages_without_the_route_or_the_server_says_it_cannot_tell(
    client: EvolutionClient, fake: FakeEvolution
) -> None:
    fake.find_messages_route = False
    answer = await client.find_messages("main", recipient_jid(NUMBER))
    assert (answer.ok, answer.http_status) == (False, 404)
    assert answer.reason == "Evolution has no such route (404) - check EVOLUTION_API_URL"
    await fake.go_down()
    answer = await client.find_messages("main", recipient_jid(NUMBER))
    assert not answer.ok and "cannot connect to Evolution" in answer.reason
    assert_no_key(answer)


def _record(key: str, text: Any, at: Any, *, from_me: bool = True) -> dict[str, Any]:
    return {
        "key": {"id": key, "fromMe": from_me, "remoteJid": f"{NUMBER}@s.whatsapp.net"},
        "message": {"conversation": text} if isinstance(text, str) else text,
        "messageTimestamp": at,
    }


def test_parse_messages_reads_v2_records_and_v1_lists() -> None:
    v2 = {
        "messages": {"total": 1, "pages": 1, "currentPage": 1, "records": [_record("A", TEXT, 100)]}
    }
    v1 = [_record("B", {"extendedTextMessage": {"text": TEXT}}, "200"), {"key": {}}, "junk"]
    assert parse_messages(v2) == (
        StoredMessage("A", f"{NUMBER}@s.whatsapp.net", True, TEXT, 100.0),
    )
    assert parse_messages(v1) == (
        StoredMessage("B", f"{NUMBER}@s.whatsapp.net", True, TEXT, 200.0),
    )
    assert parse_messages(None) == parse_messages({"messages": None}) == ()


def test_match_sent_takes_only_our_copies_of_the_text_since_the_attempt() -> None:
    started = 10_000.0
    messages = parse_messages(
        [
            _record("NEW", TEXT, started + 5),
            _record("SKEWED", TEXT, started - LOOKUP_CLOCK_SKEW),  # within the allowance
            _record("OLD", TEXT, started - LOOKUP_CLOCK_SKEW - 1),  # an earlier message's
            _record("OTHER-TEXT", TEXT + ".", started + 1),
            _record("INCOMING", TEXT, started + 1, from_me=False),
            _record("UNDATED", TEXT, None),
            _record("TAKEN", TEXT, started + 2),  # recorded for another message
        ]
    )
    found = match_sent(messages, TEXT, started, taken={"TAKEN"})
    assert [m.key_id for m in found] == ["SKEWED", "NEW"]  # oldest first
    outcome = found_outcome(found)
    assert (outcome.kind, outcome.key_id, outcome.copies) == (K.FOUND, "SKEWED", 2)
    assert outcome.reason.endswith("not sent again; Evolution holds 2 copies")
    assert match_sent(messages, "another text", started) == ()


def test_the_lookup_asks_for_the_jid_evolution_stores() -> None:
    assert recipient_jid(NUMBER) == f"{NUMBER}@s.whatsapp.net"
    assert recipient_jid(NUMBER, EVOLUTION_CHANNEL) == NUMBER  # kept as sent
    assert recipient_jid("120363000000000000@g.us") == "120363000000000000@g.us"
    assert find_messages_body("x@s.whatsapp.net") == {
        "where": {"key": {"remoteJid": "x@s.whatsapp.net", "fromMe": True}},
        "offset": 50,
    }
