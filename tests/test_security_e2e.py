"""Issue #6 on real processes: the bind rule, `evomsgd token ...`, secrets kept out of everything."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import API_KEY, ROOT, FakeProcess, daemon_env, free_port, wait_until
from tests.test_e2e import Daemon, evolution_env, fake_proc, request

pytestmark = pytest.mark.slow
__all__ = ["fake_proc"]  # the fixture, shared with test_e2e

MESSAGE = {"phone": "+5511988887777", "message": "hi", "instance_name": "main"}


def evomsgd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evomsgd", *args],
        cwd=ROOT,
        env=daemon_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_public_bind_without_tokens_is_refused(tmp_path: Path) -> None:
    port = str(free_port())
    result = evomsgd(
        "serve", "--sandbox", "--host", "0.0.0.0", "--port", port, "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: refusing to listen on 0.0.0.0:{port} without API tokens: anyone who can reach "
        "it could send WhatsApp messages from your number - create a token (`evomsgd token "
        "create NAME`), or listen on 127.0.0.1 (EVOMSGD_HOST), or pass --insecure-no-auth if a "
        "proxy in front of evomsgd authenticates every request"
    )
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


def test_insecure_no_auth_starts_and_says_so_loudly(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path / "data", free_port(), "--sandbox", "--host", "0.0.0.0", "--insecure-no-auth"
    )
    try:
        assert request(daemon.url + "/messages", MESSAGE)[0] == 202
        assert "WARNING" in daemon.logs() and "INSECURE: listening on 0.0.0.0:" in daemon.logs()
    finally:
        assert daemon.stop() == 0


def test_tokens_from_the_cli_guard_a_public_daemon_and_never_leak(
    tmp_path: Path, fake_proc: FakeProcess
) -> None:
    data_dir = tmp_path / "data"
    where = {"EVOMSGD_DATA_DIR": str(data_dir)}
    created = evomsgd("token", "create", "shop-app", "--instance", "main", **where)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("evm_") and "\n" not in token
    assert created.stderr.strip() == (
        "token 'shop-app' created for main. Store it now: it cannot be shown again."
    )
    again = evomsgd("token", "create", "shop-app", **where)
    assert again.returncode == 1 and "a token named 'shop-app' already exists" in again.stderr

    port = free_port()
    env = {**evolution_env(fake_proc), "EVOMSGD_LOG_LEVEL": "DEBUG"}
    daemon = Daemon(data_dir, port, "--host", "0.0.0.0", token=token, **env)
    outputs: list[str] = []
    try:
        assert request(daemon.url + "/messages", MESSAGE)[0] == 401
        status, body = request(daemon.url + "/messages", MESSAGE, token=token)
        assert status == 202
        wait_until(lambda: len(fake_proc.received()) == 1, 10, "the send")
        assert (
            request(daemon.url + "/messages", {**MESSAGE, "instance_name": "x"}, token=token)[0]
            == 403
        )

        # What `curl -X DELETE -H 'Authorization: Bearer ...' URL` sends: no body, no Content-Type.
        later = {**MESSAGE, "send_at": "2099-01-01T00:00:00Z"}
        scheduled = request(daemon.url + "/messages", later, token=token)[1]["task_id"]
        cancel = urllib.request.Request(
            f"{daemon.url}/tasks/{scheduled}",
            method="DELETE",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(cancel, timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "CANCELED"

        client = {"EVOMSGD_PORT": str(port), **where}
        anonymous = evomsgd("status", **client)
        assert anonymous.returncode == 2
        assert (
            "the daemon needs an API token for /health - pass --token or set EVOMSGD_TOKEN"
            in anonymous.stdout
        )
        known = evomsgd("status", **client, EVOMSGD_TOKEN=token)
        assert known.returncode == 0 and "evomsgd is UP (ok)" in known.stdout, known.stdout
        shown = evomsgd("tasks", "show", body["task_id"], "--json", **client, EVOMSGD_TOKEN=token)
        assert shown.returncode == 0 and '"status": "SUCCESS"' in shown.stdout
        outputs += [anonymous.stdout, anonymous.stderr, known.stdout, shown.stdout]

        # Made and revoked while the daemon runs: it notices without a restart.
        second = evomsgd("token", "create", "ops", **where).stdout.strip()
        wait_until(lambda: request(daemon.url + "/tasks", token=second)[0] == 200, 5, "new token")
        listed = evomsgd("token", "list", **where)
        assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
            ["ops", "*"],
            ["shop-app", "main"],
        ]
        revoked = evomsgd("token", "revoke", "ops", **where)
        assert revoked.stdout.strip() == "token 'ops' revoked"
        wait_until(lambda: request(daemon.url + "/tasks", token=second)[0] == 401, 5, "revocation")
        unknown = evomsgd("token", "revoke", "ops", **where)
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == "error: no token named 'ops' - see `evomsgd token list`"
        outputs += [listed.stdout, evomsgd("token", "list", "--json", **where).stdout]
    finally:
        assert daemon.stop() == 0
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    files = sorted(data_dir.iterdir())
    for path in files:
        if path.name.startswith("evomsgd.db"):
            assert (path.stat().st_mode & 0o777) == 0o600, path
    everything = "\n".join(outputs) + daemon.logs()
    raw = b"".join(path.read_bytes() for path in files if path.is_file())
    for secret in (token, second, API_KEY):
        assert secret not in everything, secret[:6]
        assert secret.encode() not in raw, secret[:6]
