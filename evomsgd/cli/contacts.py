"""`evomsgd contacts forget PHONE`: clear what the ledger remembers of a number."""

from __future__ import annotations

from typing import Any

import click

from evomsgd.cli.common import common_options, fail, handle_errors, ledger_of, settings_from
from evomsgd.phone import PhoneError, normalize


@click.group()
def contacts() -> None:
    """What evomsgd remembers of recipients: numbers WhatsApp said are not on WhatsApp.

    A message to such a number fails at once, without asking WhatsApp again, for
    EVOMSGD_NOT_ON_WHATSAPP_TTL (7 days by default).
    """


@contacts.command("forget")
@common_options
@click.argument("phone")
@click.option("--instance", help="Only for this instance (default: every instance).")
@handle_errors
def contacts_forget(phone: str, instance: str | None, **flags: Any) -> None:
    """Forget that PHONE is not on WhatsApp: the next message to it is sent (asking WhatsApp).

    Example:

        evomsgd contacts forget +5511988887777
    """

    settings = settings_from(**flags)
    try:
        number = normalize(phone, settings.default_region).number
    except PhoneError as exc:
        fail(f"phone {phone!r}: {exc}")
        return
    store = ledger_of(settings)
    try:
        forgotten = store.forget_contact(number, instance)
    finally:
        store.close()
    if forgotten:
        click.echo(f"forgot {number} for {', '.join(forgotten)}: the next message to it is sent")
    else:
        click.echo(f"nothing remembered of {number}" + (f" for {instance}" if instance else ""))
