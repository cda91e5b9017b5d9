"""What every `evomsgd` command shares: its one error wrapper, its options, how it reaches the
daemon, how it prints."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from evomsgd.cli.daemon_client import DaemonClient, Reply, error_text
from evomsgd.config import Settings, load_settings, resolve_data_dir
from evomsgd.errors import EvomsgdError
from evomsgd.ledger.store import Store

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` on stderr and exit with `code`."""
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """The CLI's one error wrapper: an EvomsgdError becomes one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EvomsgdError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def common_options(func: F) -> F:
    """Options every command shares: where the config and the daemon are."""
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML config file [env: EVOMSGD_CONFIG].",
    )(func)
    func = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Data directory [env: EVOMSGD_DATA_DIR].",
    )(func)
    return func


def client_options(func: F) -> F:
    """How the CLI reaches a running daemon."""
    func = click.option(
        "--url",
        envvar="EVOMSGD_URL",
        help="Daemon URL [env: EVOMSGD_URL; default http://EVOMSGD_HOST:EVOMSGD_PORT].",
    )(func)
    func = click.option(
        "--token",
        envvar="EVOMSGD_TOKEN",
        help="API token, when tokens are enabled [env: EVOMSGD_TOKEN].",
    )(func)
    return common_options(func)


def color_option(func: F) -> F:
    """--color/--no-color; without either, colours only on a terminal and never with NO_COLOR."""
    return click.option(
        "--color/--no-color",
        default=None,
        help="Force colours on or off [default: on for a terminal, unless NO_COLOR is set].",
    )(func)


def use_color(flag: bool | None) -> bool:
    """Whether to print colours: the flag, else a terminal without NO_COLOR."""
    if flag is not None:
        return flag
    # https://no-color.org: any non-empty NO_COLOR turns colours off.
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def settings_from(**flags: Any) -> Settings:
    """The settings: these flags over the environment over the config file."""
    return load_settings(flags)


def client_for(url: str | None, token: str | None, settings: Settings) -> DaemonClient:
    """A client for the daemon at `url`, or at the host and port the settings give."""
    if url is None:
        host = settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"
    return DaemonClient(url, token)


def print_json(data: Any) -> None:
    """Pretty JSON on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def expect(reply: Reply, *ok: int) -> Any:
    """The reply's body when its status is one of `ok`; otherwise fail with its error."""
    if reply.status not in ok:
        fail(error_text(reply))
    return reply.body


def ledger_of(settings: Settings) -> Store:
    """The ledger a command writes beside the daemon, opened as the daemon opens it."""
    from evomsgd.daemon import open_ledger

    return open_ledger(resolve_data_dir(settings), replicated=settings.replica_url is not None)
