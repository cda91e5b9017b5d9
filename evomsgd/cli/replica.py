"""`evomsgd restore`: bring the ledger back from its Litestream replica, on this or a new machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from evomsgd.cli.common import common_options, handle_errors, settings_from
from evomsgd.config import resolve_data_dir

if TYPE_CHECKING:
    from evomsgd.engine.replication import Restored


def render(restored: Restored, url: str) -> str:
    """What `evomsgd restore` prints: what came back, and what to run next."""
    from evomsgd.engine.replication import shown

    return (
        f"restored {restored.path} from {shown(url)}: {restored.messages} messages, "
        f"{restored.unfinished} not finished (schema {restored.schema_version}, "
        f"integrity {restored.integrity})\n"
        f"{restored.flagged} waiting messages were already due: the replica may miss their "
        "sends, so each is looked up in Evolution before it is sent, and flagged as a possible "
        "duplicate\n"
        f"next: evomsgd serve --data-dir {restored.path.parent} - it sends what waits and "
        "re-sends the messages that were in flight, flagged, as after a crash"
    )


@click.command("restore")
@common_options
@click.option(
    "--from",
    "source",
    help="Replica URL: file:///..., s3://bucket/path, sftp://... [default: EVOMSGD_REPLICA_URL].",
)
@click.option("--force", is_flag=True, help="Replace an existing ledger in the data directory.")
@handle_errors
def restore_command(source: str | None, force: bool, **flags: Any) -> None:
    """Restore the ledger from its Litestream replica into the data directory (stop the daemon
    first; an existing ledger is replaced only with --force). Then start `evomsgd serve`: it
    carries on as after a crash.

    Example:

        evomsgd restore --from s3://backups/evomsgd --data-dir /var/lib/evomsgd
    """
    import os

    from evomsgd.daemon import exclusive, prepare_data_dir
    from evomsgd.engine.replication import find_litestream, give_back, restore

    settings = settings_from(**flags)
    url = source or settings.replica_url
    if url is None:
        raise click.UsageError("give --from URL (or set EVOMSGD_REPLICA_URL)")
    if source is not None:
        # The same check as the setting's: a typo fails here, not inside Litestream.
        url = settings_from(**flags, replica_url=source).replica_url or source
    binary = find_litestream(settings)
    os.umask(0o077)  # the data directory, its parents and the ledger: the daemon's alone
    data_dir = prepare_data_dir(resolve_data_dir(settings))
    with exclusive(data_dir):  # never under a running daemon
        restored = restore(binary, url, data_dir, force=force)
    give_back(data_dir)
    click.echo(render(restored, url))
