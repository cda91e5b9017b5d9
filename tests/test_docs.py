"""Docs are tests: every CLI command, setting and route appears in README.md."""

from __future__ import annotations

import re

import click

from evomsgd.app import create_app
from evomsgd.cli.main import cli
from evomsgd.config import ENV_VARS, Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "evomsgd") -> list[str]:
    names = []
    for name, command in group.commands.items():
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            names += _commands(command, full)
        else:
            names.append(full)
    return names


def test_every_cli_command_is_documented() -> None:
    commands = _commands(cli)
    assert "evomsgd serve" in commands and "evomsgd tasks show" in commands
    missing = [c for c in commands if f"`{c}" not in README]
    assert not missing, missing


def test_every_serve_flag_is_documented() -> None:
    serve = cli.commands["serve"]
    flags = [opt for param in serve.params for opt in param.opts if opt.startswith("--")]
    missing = [f for f in flags if f"`{f}`" not in README]
    assert not missing, missing


def test_every_environment_variable_is_documented() -> None:
    missing = [var for var in ENV_VARS.values() if f"`{var}`" not in README]
    assert not missing, missing
    assert set(ENV_VARS) == {n for n, f in Settings.model_fields.items() if n != "instances"}


def test_every_route_is_documented(tmp_path: object) -> None:
    app = create_app(Settings(sandbox=True), tmp_path)  # type: ignore[arg-type]
    routes = {
        (route.method, re.sub(r"\{[^}]+\}", "{}", route.resource.canonical))
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (m, re.sub(r"\{[^}]+\}", "{}", p))
        for m, p in re.findall(r"`(GET|POST|DELETE|PUT) (/[^`? ]*)", README)
    }
    skip = ("/docs/static", "/docs/init.js", "/static", "/dashboard/static")
    missing = sorted(r for r in routes if r not in documented and not r[1].startswith(skip))
    assert not missing, missing


def test_the_two_setup_commands_are_there() -> None:
    assert (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/evomsgd serve --sandbox"
        in README
    )
    assert "bash tests/run.sh" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci
