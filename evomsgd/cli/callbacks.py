"""`evomsgd callbacks ...`: the outbox of signed status callbacks, read and replayed on the
ledger itself (the daemon running or not; a running one sends what is queued within a second)."""

from __future__ import annotations

from typing import Any

import click

from evomsgd.cli.common import common_options, handle_errors, ledger_of, print_json, settings_from
from evomsgd.errors import ConfigError, NotFound


def _store(flags: dict[str, Any]) -> Any:

    return ledger_of(settings_from(**flags))


def _row_json(row: Any) -> dict[str, Any]:
    from evomsgd.web.views import callback_view

    data: dict[str, Any] = callback_view(row).model_dump(mode="json")
    return data


@click.group()
def callbacks() -> None:
    """Signed status callbacks: what was sent, what waits, what failed; replay them."""


@callbacks.command("new-secret")
def callbacks_new_secret() -> None:
    """Print a fresh whsec_ secret for EVOMSGD_CALLBACK_SECRET (nothing is stored).

    Example:

        evomsgd callbacks new-secret
    """
    from evomsgd.ledger.callbacks import new_secret

    click.echo(new_secret())


@callbacks.command("list")
@common_options
@click.option("--state", type=click.Choice(["pending", "sent", "failed"]), default=None)
@click.option("--since", default=None, help="A duration back from now: 30m, 1h, 7d.")
@click.option("--task", "task_id", default=None, help="Only this task's callbacks.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def callbacks_list(
    state: str | None,
    since: str | None,
    task_id: str | None,
    limit: int,
    as_json: bool,
    **flags: Any,
) -> None:
    """List callbacks, newest first: id, state, event, task, endpoint, attempts, last error.

    Example:

        evomsgd callbacks list --state failed --since 1h
    """
    from evomsgd.ledger import callbacks as ledger

    store = _store(flags)
    try:
        rows = ledger.listing(
            store,
            state=state,
            since=_since(since),
            message_id=task_id,
            limit=limit,
        )
    finally:
        store.close()
    if as_json:
        print_json([_row_json(row) for row in rows])
        return
    if not rows:
        click.echo("no callbacks")
        return
    for row in rows:
        where = row.endpoint or "relay"
        last = row.last_error or (f"HTTP {row.last_status}" if row.last_status else "-")
        click.echo(
            f"{row.id:<6} {row.state:<8} {row.type:<24} {row.message_id or row.instance or '-':<36} "
            f"{where:<16} {row.attempts:>3}  {last}"
        )


@callbacks.command("show")
@common_options
@click.argument("callback_id", type=int)
@handle_errors
def callbacks_show(callback_id: int, **flags: Any) -> None:
    """One callback as JSON (never its body: a relayed one may carry an instance token).

    Example:

        evomsgd callbacks show 42
    """
    from evomsgd.ledger import callbacks as ledger

    store = _store(flags)
    try:
        row = ledger.get(store, callback_id)
    finally:
        store.close()
    if row is None:
        raise NotFound(f"no callback with id {callback_id} - see `evomsgd callbacks list`")
    print_json(_row_json(row))


@callbacks.command("retry")
@common_options
@click.argument("callback_ids", type=int, nargs=-1)
@click.option("--failed", is_flag=True, help="Every failed callback (with --since: recent ones).")
@click.option("--since", default=None, help="With --failed: a duration back from now (1h, 7d).")
@handle_errors
def callbacks_retry(
    callback_ids: tuple[int, ...], failed: bool, since: str | None, **flags: Any
) -> None:
    """Send callbacks again now, under the same webhook-id: by id, or all failed ones.

    Example:

        evomsgd callbacks retry 42 43
        evomsgd callbacks retry --failed --since 1d
    """
    from evomsgd import clock
    from evomsgd.ledger import callbacks as ledger

    if not callback_ids and not failed:
        raise ConfigError("name callback ids, or pass --failed - see `evomsgd callbacks list`")
    store = _store(flags)
    try:
        ids = list(callback_ids)
        if failed:
            ids += [
                row.id
                for row in ledger.listing(store, state="failed", since=_since(since), limit=10_000)
            ]
        retried = ledger.retry(store, ids, clock.now())
    finally:
        store.close()
    click.echo(f"{len(retried)} callback(s) queued again")
    missed = sorted(set(ids) - set(retried))
    if missed:
        click.echo(
            f"not retried (unknown, or a relayed webhook already forwarded): "
            f"{', '.join(map(str, missed))}",
            err=True,
        )


@callbacks.command("endpoints")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def callbacks_endpoints(as_json: bool, **flags: Any) -> None:
    """Each endpoint's health: enabled or disabled (410), last success, last error, pending.

    Example:

        evomsgd callbacks endpoints
    """
    from evomsgd import clock
    from evomsgd.ledger import callbacks as ledger
    from evomsgd.web.views import endpoint_view

    store = _store(flags)
    try:
        pending = ledger.pending_by_endpoint(store)
        views = [
            endpoint_view(endpoint, pending.get(endpoint.name, 0))
            for endpoint in ledger.endpoints(store, clock.now())
        ]
    finally:
        store.close()
    if as_json:
        print_json([view.model_dump(mode="json") for view in views])
        return
    if not views:
        click.echo(
            "no callback endpoints (set EVOMSGD_CALLBACK_URL, or token create --callback-url)"
        )
        return
    for view in views:
        state = f"DISABLED ({view.disabled_reason})" if view.disabled_at else "enabled"
        click.echo(
            f"{view.name:<24} {state}  pending {view.pending}  last ok {view.last_ok_at or '-'}"
            f"  last error {view.last_error or '-'}"
        )


@callbacks.command("enable")
@common_options
@click.argument("name")
@handle_errors
def callbacks_enable(name: str, **flags: Any) -> None:
    """Re-enable an endpoint disabled by a 410 Gone; what waited for it goes at once.

    Example:

        evomsgd callbacks enable token:billing
    """
    from evomsgd.ledger import callbacks as ledger

    store = _store(flags)
    try:
        found = ledger.enable(store, name)
    finally:
        store.close()
    if not found:
        raise NotFound(f"no callback endpoint named {name!r} - see `evomsgd callbacks endpoints`")
    click.echo(f"endpoint {name!r} enabled")


@callbacks.command("rotate-secret")
@common_options
@click.argument("name")
@handle_errors
def callbacks_rotate_secret(name: str, **flags: Any) -> None:
    """Give a token's endpoint a new secret and print it once; the old one keeps signing too
    for EVOMSGD_CALLBACK_ROTATION_OVERLAP. (The default endpoint rotates when
    EVOMSGD_CALLBACK_SECRET changes.)

    Example:

        evomsgd callbacks rotate-secret token:billing
    """
    from evomsgd import clock
    from evomsgd.ledger import callbacks as ledger

    settings = settings_from(**flags)
    if name == ledger.DEFAULT:
        raise ConfigError(
            "the default endpoint's secret is EVOMSGD_CALLBACK_SECRET - set the new one there "
            "and restart evomsgd: the old one keeps signing for EVOMSGD_CALLBACK_ROTATION_OVERLAP"
        )
    secret = ledger.new_secret()
    store = _store(flags)
    try:
        found = ledger.rotate(store, name, secret, settings.callback_rotation_overlap, clock.now())
    finally:
        store.close()
    if not found:
        raise NotFound(f"no callback endpoint named {name!r} - see `evomsgd callbacks endpoints`")
    click.echo(secret)
    click.echo(
        f"new secret for {name!r}; the old one also signs for "
        f"{settings.callback_rotation_overlap:g}s. Store it now: it cannot be shown again.",
        err=True,
    )


def _since(value: str | None) -> float | None:
    """A duration back from now (90s, 30m, 1h, 7d) as a time."""
    from evomsgd import clock

    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if value[-1:] in units and value[:-1].isascii() and value[:-1].isdigit():
        return clock.now() - int(value[:-1]) * units[value[-1]]
    raise ConfigError(f"--since {value!r} is not a duration - write 30m, 1h or 7d")
