"""`evomsgd callbacks ...` and `token create --callback-url`: exact output, on a real ledger."""

from __future__ import annotations

import json
import re
from pathlib import Path

from evomsgd import clock
from evomsgd.config import callback_secret_valid
from evomsgd.ledger import callbacks as ledger
from evomsgd.ledger.records import CallbackOutcome
from evomsgd.ledger.store import Store
from tests.test_callbacks import SECRET, _new
from tests.test_cli import invoke


def _ledger(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    ledger.sync_default(store, "http://127.0.0.1:9/hook", SECRET, False, 60, clock.now())
    store.insert_messages([_new(0), _new(1)])
    store.cancel("task-000", clock.now())
    store.cancel("task-001", clock.now())
    failed = CallbackOutcome(1, clock.now(), b"{}", "failed", None, 500, "HTTP 500; given up")
    with store.transaction() as cur:
        ledger.record_in(cur, failed)
    return store


def test_new_secret_is_a_standard_webhooks_secret() -> None:
    result = invoke("callbacks", "new-secret")
    assert result.exit_code == 0
    secret = result.stdout.strip()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret) and callback_secret_valid(secret)
    assert invoke("callbacks", "new-secret").stdout.strip() != secret


def test_list_show_and_retry(tmp_path: Path) -> None:
    store = _ledger(tmp_path)
    env = {"EVOMSGD_DATA_DIR": str(tmp_path)}
    listing = invoke("callbacks", "list", **env)
    assert listing.exit_code == 0, listing.output
    assert listing.stdout == (
        f"2      pending  message.canceled         task-001{' ' * 28} default            0  -\n"
        f"1      failed   message.canceled         task-000{' ' * 28} default            1  "
        "HTTP 500; given up\n"
    )
    failed = invoke("callbacks", "list", "--state", "failed", "--since", "1h", **env)
    assert failed.stdout.splitlines()[0].startswith("1      failed")
    assert len(failed.stdout.splitlines()) == 1
    shown = json.loads(invoke("callbacks", "show", "1", **env).stdout)
    assert (shown["state"], shown["last_status"], shown["task_id"]) == ("failed", 500, "task-000")
    assert "body" not in shown
    missing = invoke("callbacks", "show", "99", **env)
    assert (missing.exit_code, missing.stderr) == (
        1,
        "error: no callback with id 99 - see `evomsgd callbacks list`\n",
    )
    retried = invoke("callbacks", "retry", "--failed", **env)
    assert retried.stdout == "1 callback(s) queued again\n"
    assert ledger.get(store, 1).state == "pending"  # type: ignore[union-attr]
    partly = invoke("callbacks", "retry", "2", "77", **env)
    assert partly.stdout == "1 callback(s) queued again\n"
    assert partly.stderr == ("not retried (unknown, or a relayed webhook already forwarded): 77\n")
    nothing = invoke("callbacks", "retry", **env)
    assert nothing.exit_code == 2
    assert nothing.stderr == (
        "error: name callback ids, or pass --failed - see `evomsgd callbacks list`\n"
    )
    store.close()


def test_token_create_with_a_callback_url_prints_its_secret_once(tmp_path: Path) -> None:
    env = {"EVOMSGD_DATA_DIR": str(tmp_path)}
    made = invoke("token", "create", "billing", "--callback-url", "https://b.example/cb", **env)
    assert made.exit_code == 0, made.output
    token, secret = made.stdout.splitlines()
    assert token.startswith("evm_") and callback_secret_valid(secret)
    assert made.stderr == (
        "token 'billing' created for every instance. Store it now: it cannot be shown again.\n"
        "the second line is its callback secret (verify the webhook-signature header with it); "
        "it cannot be shown again either\n"
    )
    endpoints = invoke("callbacks", "endpoints", **env)
    assert endpoints.stdout == (
        "token:billing            enabled  pending 0  last ok -  last error -\n"
    )
    assert secret not in endpoints.stdout
    assert secret not in invoke("callbacks", "endpoints", "--json", **env).stdout
    bad = invoke("token", "create", "x", "--callback-url", "ftp://b.example", **env)
    assert (bad.exit_code, bad.stderr) == (
        1,
        "error: --callback-url: 'ftp://b.example' must start with http:// or https://\n",
    )
    rotated = invoke("callbacks", "rotate-secret", "token:billing", **env)
    assert rotated.exit_code == 0, rotated.output
    assert callback_secret_valid(rotated.stdout.strip()) and rotated.stdout.strip() != secret
    assert rotated.stderr == (
        "new secret for 'token:billing'; the old one also signs for 86400s. "
        "Store it now: it cannot be shown again.\n"
    )
    store = Store(tmp_path)
    (endpoint,) = ledger.endpoints(store, clock.now())
    assert endpoint.secrets == (rotated.stdout.strip(), secret)
    store.close()
    default = invoke("callbacks", "rotate-secret", "default", **env)
    assert default.exit_code == 2
    assert "set the new one there" in default.stderr


def test_enable_names_an_unknown_endpoint(tmp_path: Path) -> None:
    store = _ledger(tmp_path)
    env = {"EVOMSGD_DATA_DIR": str(tmp_path)}
    with store.transaction() as cur:
        cur.execute("UPDATE callback_endpoints SET disabled_at = '2026-01-01 00:00:00.000'")
    assert invoke("callbacks", "enable", "default", **env).stdout == "endpoint 'default' enabled\n"
    (endpoint,) = ledger.endpoints(store, clock.now())
    assert endpoint.disabled_at is None
    unknown = invoke("callbacks", "enable", "nope", **env)
    assert (unknown.exit_code, unknown.stderr) == (
        1,
        "error: no callback endpoint named 'nope' - see `evomsgd callbacks endpoints`\n",
    )
    store.close()
