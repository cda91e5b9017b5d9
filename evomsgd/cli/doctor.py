"""`evomsgd doctor`: one line per check - OK, WARN, FAIL or SKIP - and for a problem, its fix."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

from evomsgd import clock
from evomsgd.config import Settings, load_settings, resolve_data_dir
from evomsgd.engine import replication
from evomsgd.engine.receipts import points_at_us, shown_url
from evomsgd.engine.senders import build_sender
from evomsgd.errors import ConfigError, StoreUnavailable
from evomsgd.evolution.client import EvolutionClient, new_session
from evomsgd.evolution.lookups import Answer, WebhookConfig
from evomsgd.evolution.outcomes import InstanceState, OutcomeKind, StateProbe
from evomsgd.ledger import receipts
from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.ledger.store import LEDGER_FILE, IntegrityCheck, Store
from evomsgd.models import NO_RECEIPTS

Verdict = Literal["OK", "WARN", "FAIL", "SKIP"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    verdict: Verdict
    name: str
    detail: str


def diagnose(
    flags: Mapping[str, Any], *, full: bool = False, env: Mapping[str, str] | None = None
) -> list[Check]:
    """Every check, in order; later checks SKIP when what they need failed."""
    try:
        settings = load_settings(flags, env)
    except ConfigError as exc:
        return [
            Check("FAIL", "config", str(exc)),
            Check("SKIP", "the rest", "needs a valid configuration"),
        ]
    checks = [_config(settings)]
    try:
        data_dir: Path | None = resolve_data_dir(settings, env)
    except ConfigError as exc:
        checks.append(Check("FAIL", "data dir", str(exc)))
        data_dir = None
    instances: list[str] = []
    hooks = _Hooks()
    if data_dir is not None:
        checks.append(_data_dir(data_dir))
        ledger, instances, hooks = _ledger(data_dir / LEDGER_FILE, full)
        checks.append(ledger)
    names = list(
        dict.fromkeys(
            [n for n in [settings.default_instance] if n]
            + sorted(set(instances) | set(settings.instances))
        )
    )
    checks += asyncio.run(_evolution(settings, names, hooks))
    if settings.replica_url is not None:
        checks.append(_replica(settings, settings.replica_url))
    return checks


def _replica(settings: Settings, url: str) -> Check:
    """Litestream is there and the replica URL takes writes (file://) or answers (others)."""
    try:
        binary = replication.find_litestream(settings)
        version = replication.version_of(binary)
    except replication.ReplicaError as exc:
        return Check("FAIL", "replica", str(exc))
    ok, detail = replication.check_replica(binary, url)
    where = f"{replication.shown(url)}: {detail}"
    if not ok:
        return Check("FAIL", "replica", f"{where} - fix it, or the replica stays behind")
    return Check("OK", "replica", f"{where} (Litestream {version}, {binary})")


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What the ledger knows of receipts: the secret's hash, when each instance's webhook was
    last heard, and the instances whose integration emits no receipts."""

    digest: str | None = None
    last: Mapping[str, str] = field(default_factory=dict)
    silent: frozenset[str] = frozenset()


def _config(settings: Settings) -> Check:
    try:
        settings.require_evolution()
    except ConfigError as exc:
        return Check("FAIL", "config", str(exc))
    source = f"config file {settings.config_file}" if settings.config_file else "no config file"
    mode = "sandbox mode" if settings.sandbox else f"Evolution at {settings.evolution_url}"
    if not settings.instance_fallback:
        return Check(
            "WARN",
            "config",
            "EVOLUTION_INSTANCE_NAME is not set: requests without instance_name get 422 - "
            "set it to your Evolution instance",
        )
    return Check("OK", "config", f"valid ({source}; {mode})")


def _data_dir(path: Path) -> Check:
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "FAIL",
                "data dir",
                f"{path} does not exist and {parent} is not writable - create it for the "
                "daemon's user or set EVOMSGD_DATA_DIR",
            )
        return Check("OK", "data dir", f"{path} does not exist yet; `evomsgd serve` creates it")
    if not path.is_dir():
        return Check("FAIL", "data dir", f"{path} is not a directory - set EVOMSGD_DATA_DIR")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(
            "FAIL",
            "data dir",
            f"{path} is not writable by this user - chown it to the daemon's user "
            "(or run doctor as that user)",
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check(
            "WARN",
            "data dir",
            f"{path} is open to other users (mode {mode:04o}); the ledger holds message texts "
            f"- chmod 700 {path}",
        )
    ledger = path / LEDGER_FILE
    if ledger.exists() and stat.S_IMODE(ledger.stat().st_mode) & 0o077:
        ledger_mode = stat.S_IMODE(ledger.stat().st_mode)
        return Check(
            "WARN",
            "data dir",
            f"{ledger} is readable by other users (mode {ledger_mode:04o}) - chmod 600 {ledger}",
        )
    return Check("OK", "data dir", f"{path} (mode {mode:04o}, writable)")


def _ledger(path: Path, full: bool) -> tuple[Check, list[str], _Hooks]:
    """Integrity on a read-only connection, and the instances the ledger has seen."""
    if not path.exists():
        return (
            Check("SKIP", "ledger", f"no ledger at {path} yet (created at first start)"),
            [],
            _Hooks(),
        )
    pragma: IntegrityCheck = "integrity_check" if full else "quick_check"
    try:
        store = Store(path.parent, busy_timeout=5, readonly=True)
        try:
            problems = store.integrity_problems(pragma)
            if problems:
                return (
                    Check(
                        "FAIL",
                        "ledger",
                        f"{pragma} found damage in {path}: {'; '.join(problems)} - stop the daemon, "
                        f"copy the file aside and rebuild it: sqlite3 {path} .recover | sqlite3 "
                        "recovered.db",
                    ),
                    [],
                    _Hooks(),
                )
            version = store.schema_version()
            count = store.message_count()
            instances = store.known_instances()
            hooks = _Hooks(
                receipts.secret_digest(store),
                receipts.last_webhooks(store),
                receipts.silent_instances(store),
            )
        finally:
            store.close()
    except StoreUnavailable as exc:
        return (
            Check("FAIL", "ledger", f"{exc} - is it an evomsgd ledger? restore it from a backup"),
            [],
            _Hooks(),
        )
    known = max(v for v, _, _ in MIGRATIONS)
    size = path.stat().st_size / 1_048_576
    detail = f"{pragma} ok; schema {version}; {count} messages; {size:.1f} MB"
    if version is not None and version > known:
        return (
            Check(
                "WARN",
                "ledger",
                f"{detail}; made by a newer evomsgd (schema {known} here) - upgrade",
            ),
            instances,
            hooks,
        )
    return Check("OK", "ledger", detail), instances, hooks


async def _evolution(settings: Settings, instances: list[str], hooks: _Hooks) -> list[Check]:
    if settings.sandbox:
        why = "sandbox mode: nothing is sent to Evolution"
        return [Check("SKIP", name, why) for name in ("evolution", "api key", "instances")]
    if not settings.evolution_url or not settings.evolution_key:
        why = "EVOLUTION_API_URL and EVOLUTION_API_KEY are needed (see config)"
        return [Check("SKIP", name, why) for name in ("evolution", "api key", "instances")]
    url = settings.evolution_url
    async with new_session() as session:
        client = build_sender(settings, session)
        # The probes run beside GET / (not after it): when / fails they tell a server that
        # answers (a wrong path, another program) from one that does not, at no extra wait.
        assert isinstance(client, EvolutionClient)
        info, probes, found = await asyncio.gather(
            client.server_info(),
            asyncio.gather(*(client.connection_state(name) for name in instances)),
            asyncio.gather(*(client.find_webhook(name) for name in instances)),
        )
    if not info.reachable:
        fail = Check("FAIL", "evolution", _at_url(info.reason, url))
        why = _not_checked(probes)
        return [fail, Check("SKIP", "api key", why), Check("SKIP", "instances", why)]
    checks: list[Check] = []
    if info.major is not None and info.major != settings.evolution_api_version:
        checks.append(
            Check(
                "WARN",
                "evolution",
                f"Evolution {info.version} answers at {url}, but "
                f"EVOMSGD_EVOLUTION_API_VERSION is {settings.evolution_api_version} - "
                f"set it to {info.major}",
            )
        )
    else:
        checks.append(Check("OK", "evolution", f"{info.reason} at {url}"))
    if not probes:
        return [
            *checks,
            Check("SKIP", "api key", _NO_INSTANCE),
            Check("SKIP", "instances", _NO_INSTANCE),
        ]
    first = probes[0]
    if first.http_status == 401:
        checks.append(
            Check(
                "FAIL",
                "api key",
                f"Evolution rejected EVOLUTION_API_KEY (401) asking about {instances[0]} - set "
                "the server's global key (AUTHENTICATION_API_KEY) or the instance's token",
            )
        )
        return [*checks, Check("SKIP", "instances", "the API key was rejected")]
    if first.http_status is None:
        checks.append(Check("FAIL", "api key", f"not checked: {first.reason}"))
    else:
        checks.append(
            Check(
                "OK",
                "api key",
                f"accepted (connectionState {instances[0]}: HTTP {first.http_status})",
            )
        )
    checks += [_instance(name, probe) for name, probe in zip(instances, probes, strict=True)]
    checks += [
        _receipts(name, answer, hooks) for name, answer in zip(instances, found, strict=True)
    ]
    return checks


def _receipts(name: str, answer: Answer, hooks: _Hooks) -> Check:
    """Whether the instance's webhook points at evomsgd (sends its secret), and the last receipt."""
    label = f"receipts {name}"
    setup = f"run `evomsgd webhook setup --instance {name}`"
    if name in hooks.silent:
        return Check("OK", label, f"{NO_RECEIPTS} (its integration EVOLUTION emits none)")
    if not answer.ok:
        return Check("WARN", label, f"cannot read its webhook: {answer.reason}")
    config: WebhookConfig | None = answer.data
    if config is None or not config.enabled:
        return Check("WARN", label, f"not configured: no delivery receipts - {setup}")
    if not points_at_us(config, hooks.digest):
        return Check(
            "WARN",
            label,
            f"Evolution sends them to {shown_url(config.url)}, without evomsgd's secret - "
            f"{setup} (--replace if another app uses that URL)",
        )
    last = hooks.last.get(name)
    heard = f"last receipt {clock.db_to_rfc3339(last)}" if last else "nothing received yet"
    return Check("OK", label, f"configured ({shown_url(config.url)}); {heard}")


_NO_INSTANCE = "no instance to ask: none configured or in the ledger - set EVOLUTION_INSTANCE_NAME"


def _at_url(reason: str, url: str) -> str:
    """The client's "cause - fix" reason with the URL put into the cause, so neither repeats."""
    cause, sep, fix = reason.partition(" - ")
    # Some causes name the setting ("the server at EVOLUTION_API_URL ..."): say its value there.
    if "EVOLUTION_API_URL" in cause:
        return f"{cause.replace('EVOLUTION_API_URL', url)}{sep}{fix}"
    return f"{cause} at {url}{sep}{fix}"


def _not_checked(probes: list[StateProbe]) -> str:
    """Why the key and the instances were not checked after GET / failed, as the probes tell."""
    if not probes:
        return _NO_INSTANCE
    # An HTTP status means something listens there: a wrong path or another program, which
    # "not reachable" would send the reader looking for the wrong fault.
    if any(p.http_status is not None for p in probes):
        return "not checked: the server at EVOLUTION_API_URL answers, but not as Evolution API"
    return "not checked: nothing answers at EVOLUTION_API_URL"


def _instance(name: str, probe: StateProbe) -> Check:
    label = f"instance {name}"
    if probe.state == InstanceState.OPEN:
        return Check("OK", label, "open (connected to WhatsApp)")
    if probe.state == InstanceState.CONNECTING:
        return Check(
            "WARN",
            label,
            "connecting - wait a minute; if it stays so, pair it again in Evolution's manager",
        )
    if probe.state == InstanceState.CLOSE:
        return Check(
            "FAIL",
            label,
            "close: not connected to WhatsApp - pair it: scan the QR code in Evolution's manager",
        )
    if probe.kind == OutcomeKind.UNKNOWN_INSTANCE:
        return Check(
            "FAIL",
            label,
            f"Evolution has no instance {name!r} - create it, or fix EVOLUTION_INSTANCE_NAME "
            "or the clients' instance_name",
        )
    if probe.http_status == 401:
        return Check(
            "FAIL",
            label,
            "the key is not accepted for this instance (401) - it is another instance's token; "
            "use the global key",
        )
    return Check("FAIL", label, probe.reason)


_COLORS = {"OK": "green", "WARN": "yellow", "FAIL": "red", "SKIP": None}


def render(checks: list[Check], *, color: bool) -> str:
    """One line per check: verdict, what, detail."""
    lines = []
    for check in checks:
        verdict = f"{check.verdict:<4}"
        if color:
            verdict = click.style(verdict, fg=_COLORS[check.verdict], bold=check.verdict != "SKIP")
        lines.append(f"{verdict}  {check.name:<16} {check.detail}")
    return "\n".join(lines)
