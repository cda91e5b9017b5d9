"""Docs are tests: every CLI command, setting and route appears in README.md."""

from __future__ import annotations

import json
import re
from typing import Any

import click

from evomsgd.app import create_app
from evomsgd.cli.main import cli
from evomsgd.config import ENV_VARS, Settings
from evomsgd.phone import normalize
from tests.conftest import ROOT, MakeClient, fast_settings, wait_status
from tests.fake_evolution import FakeEvolution

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


# --- README's examples, run -----------------------------------------------------------------

# Values an example can only show one instance of: checked for their shape, not their text.
_UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
VARIABLE = {
    "task_id": _UUID7,
    "evolution_key": _UUID4,  # an EVOLUTION-integration instance answers a UUID
    "created_at": _TIME,
    "expires_at": _TIME,
    "finished_at": _TIME,
    "sent_at": _TIME,
    "at": _TIME,
}


def _section(heading: str) -> str:
    start = README.index(f"### {heading}\n")
    end = README.find("\n### ", start + 1)
    return README[start:end]


def _json_blocks(text: str) -> list[Any]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def _post_body(text: str) -> dict[str, Any]:
    match = re.search(r"-d '(\{.*?\})'", text)
    assert match, f"no curl -d '{{...}}' in:\n{text}"
    body: dict[str, Any] = json.loads(match.group(1))
    return body


def _check(
    example: Any,
    actual: Any,
    where: str = "$",
    *,
    whole: bool = True,
    variable: dict[str, str] = VARIABLE,
) -> None:
    """`actual` is what README shows: the same fields (all of them when `whole`), the same
    values, except the `variable` ones, which must have the right shape; an example string
    ending in "..." stands for any value that starts as it does."""
    if isinstance(example, dict):
        assert isinstance(actual, dict), f"{where}: README shows an object, the app {actual!r}"
        if whole:
            assert set(example) == set(actual), (
                f"{where}: README shows fields {sorted(example)}, the app answers {sorted(actual)}"
            )
        for key, value in example.items():
            assert key in actual, f"{where}: README shows {key!r}, the app has no such field"
            if key in variable and isinstance(actual[key], str):
                for text, who in ((value, "README"), (actual[key], "the app")):
                    if "..." not in text:
                        assert re.fullmatch(variable[key], text), f"{where}.{key}: {who} {text!r}"
            else:
                _check(value, actual[key], f"{where}.{key}", whole=whole, variable=variable)
    elif isinstance(example, list):
        assert isinstance(actual, list) and len(actual) == len(example), (
            f"{where}: README shows {len(example)} items, the app {actual!r}"
        )
        for i, (ex, act) in enumerate(zip(example, actual, strict=True)):
            _check(ex, act, f"{where}[{i}]", whole=whole, variable=variable)
    elif isinstance(example, str) and example.endswith("..."):
        assert isinstance(actual, str) and actual.startswith(example[:-3]), (
            f"{where}: README shows {example!r}, the app {actual!r}"
        )
    else:
        assert example == actual, f"{where}: README shows {example!r}, the app {actual!r}"


def test_readmes_phone_examples_are_what_evomsgd_stores() -> None:
    pairs = re.findall(r"`([^`]+)` → `(\d+)`", README)
    assert ("+5215512345678", "525512345678") in pairs, pairs
    for raw, stored in pairs:
        assert normalize(raw).number == stored, f"README says {raw!r} is stored as {stored!r}"
    # The example filter by phone uses the stored form, or it would find nothing.
    [query] = re.findall(r"`GET /tasks\?[^`]*phone=(\d+)", README)
    assert query == normalize(_post_body(_section("`POST /messages`"))["phone"]).number


async def test_readmes_post_and_get_answers_come_from_the_app(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    # README's GET answer is the one a real EVOLUTION-integration instance gave (no WhatsApp
    # JID, a UUID key); the fake answers the same body for such an instance.
    fake.add_instance("shop", integration="EVOLUTION")
    client = await make_client(fast_settings(evolution_url=fake.url, default_instance="shop"))
    post_section = _section("`POST /messages`")
    key = re.search(r"-H 'Idempotency-Key: ([^']+)'", post_section)
    assert key, post_section
    resp = await client.post(
        "/messages", json=_post_body(post_section), headers={"Idempotency-Key": key.group(1)}
    )
    assert resp.status == 202, await resp.text()
    answer = await resp.json()
    post_example, error_example = _json_blocks(post_section)
    _check(post_example, answer)
    # The one error shape, shown for the phone '12' its message names.
    refused = await client.post("/messages", json={"phone": "12", "message": "x"})
    assert refused.status == 422
    _check(error_example, await refused.json())
    task = await wait_status(client, answer["task_id"])
    [get_example] = _json_blocks(_section("`GET /tasks/{task_id}`"))
    _check(get_example, task)
    [sent] = fake.received
    assert sent.number == task["phone"] == task["result"]["remote_jid"]


async def test_readmes_sandbox_quick_start_answers_as_shown(make_client: MakeClient) -> None:
    setup = README[README.index("## Set up") : README.index("## Installing on a server")]
    client = await make_client(fast_settings(sandbox=True, default_instance="shop"))
    resp = await client.post("/messages", json=_post_body(setup))
    assert resp.status == 202, await resp.text()
    answer = await resp.json()
    comment = re.search(r"^# (\{.*\})$", setup, re.M)
    assert comment, setup
    _check(json.loads(comment.group(1)), answer)
    task = await wait_status(client, answer["task_id"])
    shown = re.search(r"curl -s localhost:8001/tasks/\S+\s+# (.*)$", setup, re.M)
    assert shown, setup
    # A fragment of the answer: the fields it names, not every field; the sandbox's key is
    # shown by its fixed prefix.
    sandbox_key = {k: v for k, v in VARIABLE.items() if k != "evolution_key"}
    _check(json.loads("{" + shown.group(1) + "}"), task, whole=False, variable=sandbox_key)


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md is kept true: a module it does not name is a room nobody mapped."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "evomsgd"
    missing = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py") and f"`{path.name}`" not in text
    ]
    assert not missing, missing
