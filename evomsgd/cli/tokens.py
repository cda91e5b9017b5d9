"""`evomsgd token create|list|revoke`: API tokens, kept hashed in the ledger."""

from __future__ import annotations

from typing import Any

import click

from evomsgd.cli.common import common_options, handle_errors, ledger_of, print_json, settings_from


@click.group()
def token() -> None:
    """API tokens: once one exists, every API request needs `Authorization: Bearer <token>`.

    They live (hashed) in the ledger; a running daemon sees changes within a second.
    """


@token.command("create")
@common_options
@click.argument("name")
@click.option(
    "--instance",
    "instances",
    multiple=True,
    help="Only this instance may be used (repeatable); default: every instance.",
)
@click.option(
    "--callback-url",
    default=None,
    help="Its own endpoint for the signed status callbacks of its messages (only there); "
    "prints the callback secret too, once.",
)
@handle_errors
def token_create(
    name: str, instances: tuple[str, ...], callback_url: str | None, **flags: Any
) -> None:
    """Create a token and print it. It is shown this once: only its hash is stored.

    With --callback-url, a second line is the whsec_ secret that signs its callbacks.

    Example:

        evomsgd token create shop-backend --instance shop
        evomsgd token create billing --callback-url https://billing.example.com/evomsgd
    """
    from evomsgd.ledger import tokens

    store = ledger_of(settings_from(**flags))
    callback_secret = None
    try:
        if callback_url is None:
            secret = tokens.create(store, name, instances)
        else:
            secret, callback_secret = tokens.create_with_callback(
                store, name, instances, callback_url
            )
    finally:
        store.close()
    click.echo(secret)
    if callback_secret is not None:
        click.echo(callback_secret)
    scope = ", ".join(sorted(set(instances))) or "every instance"
    click.echo(
        f"token {name!r} created for {scope}. Store it now: it cannot be shown again.", err=True
    )
    if callback_secret is not None:
        click.echo(
            "the second line is its callback secret (verify the webhook-signature header "
            "with it); it cannot be shown again either",
            err=True,
        )


@token.command("list")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def token_list(as_json: bool, **flags: Any) -> None:
    """List token names, their instances and when they were made (never the tokens).

    Example:

        evomsgd token list
    """

    store = ledger_of(settings_from(**flags))
    try:
        rows = store.tokens()
    finally:
        store.close()
    if as_json:
        print_json(
            [
                {"name": r.name, "instances": list(r.instances), "created_at": r.created_at}
                for r in rows
            ]
        )
        return
    if not rows:
        click.echo("no tokens: the API answers without authentication (on loopback only)")
        return
    for row in rows:
        click.echo(f"{row.name:<24} {','.join(row.instances) or '*':<24} {row.created_at}")


@token.command("revoke")
@common_options
@click.argument("name")
@handle_errors
def token_revoke(name: str, **flags: Any) -> None:
    """Delete a token; requests that use it fail within a second, daemon restart not needed.

    Example:

        evomsgd token revoke shop-backend
    """
    from evomsgd.ledger import tokens

    store = ledger_of(settings_from(**flags))
    try:
        tokens.revoke(store, name)
    finally:
        store.close()
    click.echo(f"token {name!r} revoked")
