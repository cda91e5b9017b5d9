"""`evomsgd webhook secret`: the secret Evolution's webhooks authenticate with, kept hashed."""

from __future__ import annotations

import sys
from typing import Any

import click

from evomsgd.cli.common import common_options, handle_errors, ledger_of, settings_from


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
    from evomsgd.engine.receipts import make_secret

    store = ledger_of(settings_from(**flags))
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


@webhook.command("setup")
@common_options
@click.option(
    "--instance",
    "instances",
    multiple=True,
    help="Instance to configure (repeatable) [default: every instance evomsgd knows].",
)
@click.option(
    "--url", help="Where Evolution reaches evomsgd [env: EVOMSGD_PUBLIC_URL], without a path."
)
@click.option(
    "--replace", is_flag=True, help="Replace a webhook that sends to another URL (another app)."
)
@handle_errors
def webhook_setup(instances: tuple[str, ...], url: str | None, replace: bool, **flags: Any) -> None:
    """Point each instance's Evolution webhook at evomsgd (POST /webhook/set/INSTANCE with the
    events SEND_MESSAGE, MESSAGES_UPDATE, CONNECTION_UPDATE and the webhook secret). Evolution
    keeps one webhook per instance: one that sends elsewhere is left alone unless --replace.
    The secret is never printed.

    Exit code: 0 when every instance is configured, 1 otherwise (nothing is changed when one
    refuses).

    Example:

        evomsgd webhook setup --instance shop --url http://127.0.0.1:8001
    """
    import asyncio

    from evomsgd.engine.receipts import setup_webhooks
    from evomsgd.engine.senders import build_sender
    from evomsgd.errors import ConfigError
    from evomsgd.evolution.client import EvolutionClient, new_session

    settings = settings_from(**flags)
    base = url or settings.public_url
    if not base:
        raise ConfigError(
            "no URL for Evolution to reach evomsgd - pass --url or set EVOMSGD_PUBLIC_URL "
            "(e.g. http://127.0.0.1:8001)"
        )
    if settings.sandbox:
        raise ConfigError(
            "sandbox mode: there is no Evolution to configure - unset EVOMSGD_SANDBOX"
        )
    store = ledger_of(settings)
    try:
        names = list(instances) or list(
            dict.fromkeys(
                [n for n in [settings.default_instance] if n]
                + sorted(set(store.known_instances()) | set(settings.instances))
            )
        )
        if not names:
            raise ConfigError(
                "no instance to configure - pass --instance NAME or set EVOLUTION_INSTANCE_NAME"
            )

        async def run() -> list[Any]:
            async with new_session() as session:
                client = build_sender(settings, session)
                assert isinstance(client, EvolutionClient)
                return await setup_webhooks(
                    client, store, names, base, replace=replace, relay_for=settings.relay_for
                )

        results = asyncio.run(run())
    finally:
        store.close()
    for result in results:
        click.echo(result.line, err=not result.ok)
    if not all(result.ok for result in results):
        sys.exit(1)
