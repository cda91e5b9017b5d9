"""`evomsgd webhook secret`: the secret Evolution's webhooks authenticate with, kept hashed."""

from __future__ import annotations

from typing import Any

import click

from evomsgd.cli.common import common_options, handle_errors, settings_from
from evomsgd.config import resolve_data_dir


@click.group()
def webhook() -> None:
    """Evolution's webhooks (delivery receipts): POST /webhooks/evolution."""


@webhook.command("secret")
@common_options
@handle_errors
def webhook_secret(**flags: Any) -> None:
    """Make a new webhook secret and print it once (only its hash is stored; the old one stops
    working within a second). Put it in Evolution's webhook `headers` as x-evomsgd-secret.

    Example:

        evomsgd webhook secret
    """
    from evomsgd.daemon import open_ledger
    from evomsgd.engine.receipts import make_secret

    store = open_ledger(resolve_data_dir(settings_from(**flags)))
    try:
        secret = make_secret(store)
    finally:
        store.close()
    click.echo(secret)
    click.echo(
        "webhook secret created. Configure it in Evolution (POST /webhook/set/INSTANCE with "
        '"headers": {"x-evomsgd-secret": SECRET}), or for v1 use the URL '
        "/webhooks/evolution/key/SECRET. It cannot be shown again.",
        err=True,
    )
