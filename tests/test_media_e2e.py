"""Media against real processes: a kill -9 right after the 202 keeps the file, and the message
is delivered with it after the restart."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FakeProcess, free_port, wait_until
from tests.test_e2e import Daemon, evolution_env, request

pytestmark = pytest.mark.slow

PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< >>\n%%EOF\n" + bytes(
    range(256)
)


def set_state(fake: FakeProcess, state: str) -> None:
    body = json.dumps({"instance": "main", "state": state}).encode()
    req = urllib.request.Request(
        fake.url + "/_fake/state", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


def status(daemon: Daemon, task_id: str) -> Any:
    return request(f"{daemon.url}/tasks/{task_id}")[1]["status"]


def test_kill_9_right_after_the_202_keeps_the_file_and_delivers_it_after_restart(
    tmp_path: Path,
) -> None:
    # The instance is unpaired: the message cannot leave before the kill, whatever the timing.
    fake = FakeProcess("--instances", "main", "--state", "main=close")
    try:
        data_dir = tmp_path / "data"
        port = free_port()
        env = evolution_env(fake)
        daemon = Daemon(data_dir, port, **env)
        body = {
            "phone": "+5511988887777",
            "message": "Your invoice",
            "media": {
                "type": "document",
                "base64": base64.b64encode(PDF).decode(),
                "filename": "invoice-1042.pdf",
            },
        }
        code, answer = request(daemon.url + "/messages", body)
        assert code == 202, answer
        daemon.stop(signal.SIGKILL)  # no drain, no cleanup

        digest = hashlib.sha256(PDF).hexdigest()
        assert (data_dir / "media" / digest[:2] / digest[2:]).read_bytes() == PDF
        with sqlite3.connect(data_dir / "evomsgd.db") as conn:
            row = conn.execute(
                "SELECT media_sha256, media_size, media_filename FROM messages WHERE id = ?",
                (answer["task_id"],),
            ).fetchone()
        assert row == (digest, len(PDF), "invoice-1042.pdf")

        set_state(fake, "open")
        daemon = Daemon(data_dir, port, **env)
        wait_until(lambda: status(daemon, answer["task_id"]) == "SUCCESS", 20, "delivery")
        daemon.stop()
        sent = [r for r in fake.received() if r["status"] == 201]
        assert len(sent) == 1
        assert sent[0]["media"] == {
            "mediatype": "document",
            "mimetype": "application/pdf",
            "caption": "Your invoice",
            "media": base64.b64encode(PDF).decode(),
            "fileName": "invoice-1042.pdf",
        }
    finally:
        fake.stop()


def test_curl_uploads_a_file_with_F_and_a_browser_form_is_refused(tmp_path: Path) -> None:
    """README's upload line, with the real curl against a real daemon (no tokens): it is queued
    and sent as a document; the same form posted the way a browser would is refused."""
    fake = FakeProcess("--instances", "main")
    try:
        invoice = tmp_path / "invoice-1042.pdf"
        invoice.write_bytes(PDF)
        daemon = Daemon(tmp_path / "data", free_port(), **evolution_env(fake))
        form = [
            "-F",
            f"file=@{invoice}",
            "-F",
            "phone=+5511988887777",
            "-F",
            "message=Your invoice",
        ]
        curl = ["curl", "-s", "-w", "\n%{http_code}", *form, daemon.url + "/messages"]
        refused = subprocess.run(
            [*curl, "-H", "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/60.0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rsplit("\n", 1)
        assert refused[1] == "403" and json.loads(refused[0])["error"]["code"] == "forbidden_form"
        out = subprocess.run(curl, capture_output=True, text=True, check=True).stdout
        body, code = out.rsplit("\n", 1)
        assert code == "202", body
        task_id = json.loads(body)["task_id"]
        wait_until(lambda: status(daemon, task_id) == "SUCCESS", 20, "delivery")
        daemon.stop()
        sent = [r for r in fake.received() if r["status"] == 201]
        assert len(sent) == 1
        assert sent[0]["media"]["fileName"] == "invoice-1042.pdf"
        assert sent[0]["media"]["media"] == base64.b64encode(PDF).decode()
    finally:
        fake.stop()
