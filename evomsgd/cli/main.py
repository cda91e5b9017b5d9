"""The `evomsgd` command: parse, call one library function, render."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from evomsgd import __version__
from evomsgd.cli.callbacks import callbacks
from evomsgd.cli.common import (
    EXIT_DEGRADED,
    EXIT_DOWN,
    EXIT_OK,
    client_for,
    client_options,
    color_option,
    common_options,
    expect,
    fail,
    handle_errors,
    print_json,
    settings_from,
    use_color,
)
from evomsgd.cli.contacts import contacts
from evomsgd.cli.daemon_client import error_text
from evomsgd.cli.replica import restore_command
from evomsgd.cli.tokens import token
from evomsgd.cli.webhook import webhook
from evomsgd.config import resolve_data_dir


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="evomsgd")
def cli() -> None:
    """evomsgd: queue and deliver transactional WhatsApp messages through Evolution API.

    One process and one SQLite file replace FastAPI + Celery + Redis + Flower.

    Example:

        evomsgd serve --sandbox
    """


@cli.command()
@common_options
@click.option("--host", help="Address to listen on [env: EVOMSGD_HOST; default 127.0.0.1].")
@click.option("--port", type=int, help="TCP port [env: EVOMSGD_PORT; default 8001].")
@click.option("--workers", type=int, help="Huey worker threads [env: EVOMSGD_WORKERS; default 4].")
@click.option(
    "--sandbox",
    is_flag=True,
    default=None,
    help="Record messages in the ledger, send nothing [env: EVOMSGD_SANDBOX].",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    default=None,
    help="Allow a non-loopback --host without API tokens (a proxy must authenticate) "
    "[env: EVOMSGD_INSECURE_NO_AUTH].",
)
@click.option("--evolution-url", help="Evolution API base URL [env: EVOLUTION_API_URL].")
@click.option(
    "--evolution-key", help="Evolution API key [env: EVOLUTION_API_KEY]; prefer the env file."
)
@click.option(
    "--instance", "default_instance", help="Default instance [env: EVOLUTION_INSTANCE_NAME]."
)
@click.option(
    "--durability",
    type=click.Choice(["full", "normal"]),
    help="full: fsync before 202; normal: faster, may lose the last messages on power loss.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="[env: EVOMSGD_LOG_LEVEL; default INFO].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="[env: EVOMSGD_LOG_FORMAT; default text].",
)
@handle_errors
def serve(**flags: Any) -> None:
    """Run the daemon: HTTP API, dispatcher and Huey workers in one process.

    Example:

        EVOLUTION_API_URL=http://localhost:8080 EVOLUTION_API_KEY=... evomsgd serve
    """
    from evomsgd import log
    from evomsgd.daemon import serve as run

    if flags.get("log_level"):
        flags["log_level"] = flags["log_level"].upper()
    settings = settings_from(**flags)
    settings.require_evolution()
    if settings.replica_url is not None:
        from evomsgd.engine.replication import require

        require(settings)  # before the ledger opens: a replica promised and missing is an error
    log.configure(settings.log_level, settings.log_format)
    sys.exit(run(settings, resolve_data_dir(settings)))


@cli.command()
@client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@color_option
@handle_errors
def status(
    url: str | None, token: str | None, as_json: bool, color: bool | None, **flags: Any
) -> None:
    """Is the daemon up and healthy? Reads the ledger directly when it is down.

    Exit code: 0 healthy, 1 degraded, 2 down.

    Examples:

        evomsgd status --json | jq .counts

        evomsgd status --color | less -R
    """
    from evomsgd.cli.status import gather, render

    settings = settings_from(**flags)
    report = gather(settings, client_for(url, token, settings))
    if as_json:
        print_json(report)
    else:
        click.echo(render(report, color=use_color(color)), color=True)
    sys.exit({"ok": EXIT_OK, "degraded": EXIT_DEGRADED}.get(report["status"], EXIT_DOWN))


@cli.command()
@common_options
@click.option(
    "--sandbox", is_flag=True, default=None, help="Check a sandbox set-up [env: EVOMSGD_SANDBOX]."
)
@click.option(
    "--full", is_flag=True, help="PRAGMA integrity_check instead of quick_check (slower)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@color_option
def doctor(full: bool, as_json: bool, color: bool | None, **flags: Any) -> None:
    """Check the configuration, the data directory, the ledger, Evolution, the API key and each
    instance: one line each, OK / WARN / FAIL / SKIP, with the fix. Never prints the key.

    Exit code: 0 when nothing FAILs, 1 otherwise.

    Example:

        evomsgd doctor
    """
    from evomsgd.cli.doctor import diagnose, render

    checks = diagnose(flags, full=full)
    if as_json:
        print_json([{"check": c.name, "verdict": c.verdict, "detail": c.detail} for c in checks])
    else:
        click.echo(render(checks, color=use_color(color)), color=True)
    sys.exit(1 if any(c.verdict == "FAIL" for c in checks) else 0)


@cli.command()
@common_options
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@click.option(
    "--vacuum",
    is_flag=True,
    help="Then rewrite the file (VACUUM): shrinks a ledger made before incremental "
    "auto-vacuum and turns it on; blocks the daemon's writes while it runs.",
)
@click.option(
    "--keep-success-days",
    type=click.FloatRange(min=0),
    help="[env: EVOMSGD_KEEP_SUCCESS_DAYS; default 30; 0 keeps them].",
)
@click.option(
    "--keep-failed-days",
    type=click.FloatRange(min=0),
    help="[env: EVOMSGD_KEEP_FAILED_DAYS; default 90; 0 keeps them].",
)
@click.option(
    "--erase-text-days",
    type=click.FloatRange(min=0),
    help="Erase texts of messages finished this long ago [env: EVOMSGD_ERASE_TEXT_DAYS].",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def purge(dry_run: bool, vacuum: bool, as_json: bool, **flags: Any) -> None:
    """Apply retention now: delete old finished messages and their history, erase old texts,
    drop expired idempotency keys. Works on the SQLite file, whether the daemon runs or not
    (short transactions of 1000 rows). Run it as the daemon's user.

    Examples:

        evomsgd purge --dry-run

        evomsgd purge --keep-success-days 7 --vacuum
    """
    import dataclasses
    import time

    from evomsgd import clock
    from evomsgd.cli.purge import render
    from evomsgd.engine.purger import policy
    from evomsgd.errors import DataDirError
    from evomsgd.ledger import retention
    from evomsgd.ledger.store import LEDGER_FILE, Store

    settings = settings_from(**flags)
    data_dir = resolve_data_dir(settings)
    if not (data_dir / LEDGER_FILE).is_file():
        raise DataDirError(
            f"no ledger at {data_dir / LEDGER_FILE} - nothing to purge "
            "(set EVOMSGD_DATA_DIR or --data-dir to the daemon's data directory)"
        )
    rules = policy(settings)
    store = Store(
        data_dir, durability=settings.durability, replicated=settings.replica_url is not None
    )
    try:
        report = retention.purge(store, clock.now(), rules, dry_run=dry_run)
        if vacuum and not dry_run:
            started = time.monotonic()
            report.vacuum = retention.reclaim(store, full=True)
            report.bytes_after = store.file_size()
            report.seconds = round(report.seconds + time.monotonic() - started, 3)
    finally:
        store.close()
    if as_json:
        print_json(dataclasses.asdict(report))
    else:
        click.echo(render(report, rules))


@cli.command()
@client_options
@click.option("--phone", required=True, help="Recipient: +5215512345678, or a JID.")
@click.option("--message", required=True, help="Text to send.")
@click.option(
    "--instance", help="Evolution instance (default: the daemon's EVOLUTION_INSTANCE_NAME)."
)
@click.option(
    "--priority", type=click.Choice(["normal", "high"]), default="normal", show_default=True
)
@click.option("--send-at", help="RFC 3339 time to send at (SCHEDULED until then).")
@click.option("--idempotency-key", help="Retry-safe key: the same key and body queue only once.")
@handle_errors
def send(
    url: str | None,
    token: str | None,
    phone: str,
    message: str,
    instance: str | None,
    priority: str,
    send_at: str | None,
    idempotency_key: str | None,
    **flags: Any,
) -> None:
    """Queue a message through the running daemon and print its task id.

    Example:

        evomsgd send --phone +5215512345678 --message "Your code is 123456" --priority high
    """
    body: dict[str, Any] = {"phone": phone, "message": message, "priority": priority}
    if instance:
        body["instance_name"] = instance
    if send_at:
        body["send_at"] = send_at
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    settings = settings_from(**flags)
    reply = client_for(url, token, settings).request("POST", "/messages", body, headers)
    data = expect(reply, 200, 202)
    click.echo(data["task_id"])


@cli.group()
def tasks() -> None:
    """Look at tasks (messages) in the ledger."""


@tasks.command("show")
@client_options
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def tasks_show(
    url: str | None, token: str | None, task_id: str, as_json: bool, **flags: Any
) -> None:
    """Show one task's status, result and history.

    Example:

        evomsgd tasks show 0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11
    """
    from evomsgd.cli.status import render_task

    settings = settings_from(**flags)
    data = expect(client_for(url, token, settings).request("GET", f"/tasks/{task_id}"), 200)
    click.echo(json.dumps(data, indent=2, ensure_ascii=False) if as_json else render_task(data))


@tasks.command("list")
@client_options
@click.option(
    "--status", "statuses", multiple=True, help="Filter by status (repeatable), e.g. FAILURE."
)
@click.option(
    "--delivery",
    "deliveries",
    multiple=True,
    help="Filter by delivery state (repeatable): delivered, read, failed, unconfirmed, ...",
)
@click.option("--instance", help="Filter by instance.")
@click.option("--phone", help="Filter by normalised phone (digits) or JID.")
@click.option("--since", help="RFC 3339 time or a duration: 30m, 1h, 7d.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def tasks_list(
    url: str | None,
    token: str | None,
    statuses: tuple[str, ...],
    deliveries: tuple[str, ...],
    instance: str | None,
    phone: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
    **flags: Any,
) -> None:
    """List tasks, newest first.

    Example:

        evomsgd tasks list --status FAILURE --since 1h
        evomsgd tasks list --delivery unconfirmed --delivery failed
    """
    from urllib.parse import urlencode

    from evomsgd.cli.status import render_list

    query: list[tuple[str, str]] = [("status", s) for s in statuses]
    query += [("delivery", d) for d in deliveries]
    query += [(k, v) for k, v in (("instance", instance), ("phone", phone), ("since", since)) if v]
    query.append(("limit", str(limit)))
    settings = settings_from(**flags)
    data = expect(
        client_for(url, token, settings).request("GET", "/tasks?" + urlencode(query)), 200
    )
    click.echo(
        json.dumps(data, indent=2, ensure_ascii=False) if as_json else render_list(data["tasks"])
    )


@cli.command()
@client_options
@click.argument("task_id")
@handle_errors
def cancel(url: str | None, token: str | None, task_id: str, **flags: Any) -> None:
    """Cancel a message that has not been sent yet.

    Example:

        evomsgd cancel 0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11
    """
    settings = settings_from(**flags)
    data = expect(client_for(url, token, settings).request("DELETE", f"/tasks/{task_id}"), 200)
    click.echo(f"{data['task_id']} {data['status']}")


@cli.command()
@client_options
@click.argument("task_id", required=False)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    help="Bulk: retry every task with this status (FAILURE, EXPIRED, CANCELED).",
)
@click.option("--since", help="Bulk: only tasks created since (RFC 3339 or 30m, 1h, 7d).")
@click.option("--instance", help="Bulk: only this instance.")
@handle_errors
def retry(
    url: str | None,
    token: str | None,
    task_id: str | None,
    statuses: tuple[str, ...],
    since: str | None,
    instance: str | None,
    **flags: Any,
) -> None:
    """Send a failed, expired or canceled message again (its history is kept).

    Examples:

        evomsgd retry 0b6f1c9e-7c1a-4c55-9d49-8f1b7a0f2d11

        evomsgd retry --status FAILURE --since 1h --instance shop
    """
    from urllib.parse import urlencode

    settings = settings_from(**flags)
    client = client_for(url, token, settings)
    if task_id:
        if statuses or since or instance:
            fail("give a task id or bulk filters (--status/--since/--instance), not both", 2)
        data = expect(client.request("POST", f"/tasks/{task_id}/retry"), 202)
        click.echo(f"{data['task_id']} {data['status']}")
        return
    if not statuses:
        fail("give a task id, or --status FAILURE (with --since/--instance) for a bulk retry", 2)
    requeued = failed = 0
    before: str | None = None
    seen: set[str] = set()
    while True:
        query = [("status", ",".join(statuses)), ("limit", "500")]
        query += [
            (k, v) for k, v in (("instance", instance), ("since", since), ("before", before)) if v
        ]
        page = expect(client.request("GET", "/tasks?" + urlencode(query)), 200)
        for task in page["tasks"]:
            if task["task_id"] in seen:
                continue
            seen.add(task["task_id"])
            reply = client.request("POST", f"/tasks/{task['task_id']}/retry")
            if reply.status == 202:
                requeued += 1
            else:
                failed += 1
                click.echo(f"{task['task_id']}: {error_text(reply)}", err=True)
        before = page.get("next_before")
        if not before:
            break
    click.echo(
        f"requeued {requeued} task(s)" + (f", {failed} could not be retried" if failed else "")
    )
    if failed:
        sys.exit(1)


def _pause_command(paused: bool) -> Callable[..., None]:
    @client_options
    @click.argument("instance")
    @handle_errors
    def command(url: str | None, token: str | None, instance: str, **flags: Any) -> None:
        settings = settings_from(**flags)
        action = "pause" if paused else "resume"
        data = expect(
            client_for(url, token, settings).request("POST", f"/instances/{instance}/{action}", {}),
            200,
        )
        click.echo(f"{data['instance']} {'paused' if data['paused'] else 'resumed'}")

    return command


cli.command(
    "pause",
    help="Stop sending on an instance; its messages keep waiting.\n\nExample:\n\n    evomsgd pause shop",
)(_pause_command(True))
cli.command(
    "resume", help="Resume sending on a paused instance.\n\nExample:\n\n    evomsgd resume shop"
)(_pause_command(False))


cli.add_command(token)
cli.add_command(contacts)
cli.add_command(webhook)
cli.add_command(restore_command)
cli.add_command(callbacks)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="evomsgd")
