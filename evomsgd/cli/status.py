"""`evomsgd status`: ask the daemon, or read the ledger directly when it is down; render it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from evomsgd import __version__, clock
from evomsgd.cli.daemon_client import DaemonClient
from evomsgd.config import Settings, resolve_data_dir
from evomsgd.errors import ConfigError, DaemonUnreachable, StoreUnavailable
from evomsgd.ledger.store import LEDGER_FILE, Store


def gather(settings: Settings, client: DaemonClient) -> dict[str, Any]:
    """The daemon's /health with `daemon: up`, or the ledger's contents with `daemon: down`."""
    try:
        reply = client.request("GET", "/health")
    except DaemonUnreachable as exc:
        return read_ledger(settings, str(exc))
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.status in (200, 503) and "status" in body:
        return {"daemon": "up", "url": client.base_url, **body}
    if reply.status == 401:
        why = (
            "the daemon needs an API token for /health - pass --token or set EVOMSGD_TOKEN"
            if not client.token
            else "the daemon refused the API token (mistyped or revoked) - check --token/EVOMSGD_TOKEN"
        )
        return {
            "daemon": "up",
            "url": client.base_url,
            "status": "down",
            "problems": [why],
            "version": None,
        }
    return {
        "daemon": "up",
        "url": client.base_url,
        "status": "down",
        "problems": [f"/health answered {reply.status}"],
        "version": None,
    }


def read_ledger(settings: Settings, why: str) -> dict[str, Any]:
    """What the SQLite file says, opened read-only (works while the daemon is down)."""
    report: dict[str, Any] = {
        "daemon": "down",
        "status": "down",
        "problems": [why],
        "version": __version__,
    }
    try:
        data_dir = resolve_data_dir(settings)
    except ConfigError as exc:
        report["problems"].append(str(exc))
        return report
    path = data_dir / LEDGER_FILE
    report["data_dir"] = str(data_dir)
    report["sandbox"] = settings.sandbox
    if not path.exists():
        report["problems"].append(f"no ledger at {path} yet")
        return report
    try:
        store = Store(data_dir, busy_timeout=2, readonly=True)
        try:
            counts = store.counts()
            oldest = store.oldest_waiting(clock.now())
            paused = store.paused_lanes()
            lanes = []
            for instance, unsent, last in store.unsent_by_instance():
                lane: dict[str, Any] = {
                    "instance": instance,
                    "state": "stopped",
                    "waiting": unsent,
                    "last_error": last,
                }
                if instance in paused:
                    lane["state"], lane["paused_reason"] = "paused", paused[instance]
                lanes.append(lane)
            last_error = store.last_error()
            # The daemon may have run with --sandbox, which this command's settings do not know.
            report["sandbox"] = settings.sandbox or store.newest_is_sandbox()
        finally:
            store.close()
    except StoreUnavailable as exc:
        report["problems"].append(str(exc))
        return report
    report["counts"] = counts
    report["oldest_waiting_seconds"] = None if oldest is None else round(oldest, 3)
    report["instances"] = lanes
    report["last_error"] = last_error
    return report


_COLORS = {"ok": "green", "degraded": "yellow", "down": "red"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86_400:
        return f"{s // 86_400}d{s % 86_400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def ago(at: str, now: float) -> str:
    """How long before `now` the RFC 3339 time `at` was, coarsely: '40 s ago', '12 min ago'."""
    s = max(0, int(now - datetime.fromisoformat(at).timestamp()))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86_400:
        return f"{s // 3600} h ago"
    days = s // 86_400
    return f"{days} day{'' if days == 1 else 's'} ago"


def _budgets(lane: dict[str, Any]) -> list[str]:
    """Today's sends against the cap, the warm-up day, new contacts against their budget."""
    parts = []
    if lane.get("daily_cap") is not None:
        parts.append(f"sent today {lane.get('sent_today') or 0}/{lane['daily_cap']}")
    if lane.get("warmup_day") is not None:
        parts.append(f"warm-up day {lane['warmup_day']}/{lane.get('warmup_days')}")
    if lane.get("new_contacts_per_day") is not None:
        parts.append(
            f"new contacts {lane.get('new_contacts_today') or 0}/{lane['new_contacts_per_day']}"
        )
    return parts + _quiet(lane)


def _quiet(lane: dict[str, Any]) -> list[str]:
    """The lane's quiet hours and when they end for the messages they hold, first zone first."""
    if not lane.get("quiet_hours"):
        return []
    parts = [f"quiet hours {lane['quiet_hours']}"]
    ends = lane.get("quiet_ends") or []
    if ends:
        others = len(ends) - 1
        more = f" and {others} other zone{'' if others == 1 else 's'}" if others else ""
        parts.append(
            f"holding {lane.get('quiet_held') or 0} until {ends[0]['until']} "
            f"({ends[0]['zone']}{more})"
        )
    return parts


def _lane_trouble(lane: dict[str, Any], now: float) -> str | None:
    """What stops the lane now; else its last error as history, with when it recovered."""
    if "problem" not in lane:
        # Read from the ledger while the daemon is down: a message's error, with no time.
        return f"last error: {lane['last_error']}" if lane.get("last_error") else None
    if lane["problem"]:
        return f"problem: {lane['problem']}"
    if not lane.get("last_error"):
        return None
    when = f" {ago(lane['last_error_at'], now)}" if lane.get("last_error_at") else ""
    history = f"last error{when} ({lane['last_error']})"
    if lane.get("recovered_at"):
        history += f", recovered {ago(lane['recovered_at'], now)}"
    return history


def replica_line(replica: dict[str, Any], now: float) -> str:
    """The replication's state, where to, the last successful upload and the lag."""
    synced = ago(replica["last_sync_at"], now) if replica.get("last_sync_at") else "never"
    lag = replica.get("lag_seconds")
    line = (
        f"{replica['state']} to {replica['replica']}, last sync {synced}, "
        f"lag {'-' if lag is None else f'{lag:g}s'}"
    )
    if replica.get("restarts"):
        line += f", Litestream restarted {replica['restarts']} times"
    return line


def render(report: dict[str, Any], *, color: bool, now: float | None = None) -> str:
    """Human-readable status; colours only on a terminal; durations relative to `now`."""
    now = clock.now() if now is None else now

    def style(text: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(text, fg=fg, bold=bold) if color else text

    status = report.get("status", "down")
    head = f"evomsgd is {'UP' if report['daemon'] == 'up' else 'DOWN'} ({status})"
    lines = [style(head, _COLORS.get(status), bold=True)]
    if report.get("sandbox"):
        lines.append(style("SANDBOX MODE: messages are recorded, never sent", "yellow", bold=True))
    facts = [
        ("version", report.get("version")),
        (
            "uptime",
            _duration(report.get("uptime_seconds"))
            if report.get("uptime_seconds") is not None
            else None,
        ),
        ("url", report.get("url")),
        ("mode", None if "sandbox" not in report else "sandbox" if report["sandbox"] else "live"),
        ("data dir", report.get("data_dir")),
        ("evolution", report.get("evolution_url")),
    ]
    if report.get("workers_configured"):
        facts.append(
            ("workers", f"{report.get('workers_alive')}/{report['workers_configured']} alive")
        )
    if report.get("replication"):
        facts.append(("replica", replica_line(report["replication"], now)))
    lines += [f"  {name:<10} {value}" for name, value in facts if value]
    counts = report.get("counts") or {}
    if counts:
        lines.append(
            "  messages   " + "  ".join(f"{name} {count}" for name, count in counts.items())
        )
        lines.append(f"  oldest waiting {_duration(report.get('oldest_waiting_seconds'))}")
    for lane in report.get("instances") or []:
        state = lane.get("state", "?")
        fg = {
            "down": "red",
            "config_error": "red",
            "close": "red",
            "paused": "yellow",
            "held": "yellow",
        }.get(state)
        parts = [
            f"  instance {lane['instance']:<16}",
            style(f"{state:<12}", fg),
            f"waiting {lane.get('waiting', 0)}",
        ]
        if lane.get("next_send_at"):
            parts.append(f"next send {lane['next_send_at']}")
        parts += _budgets(lane)
        trouble = _lane_trouble(lane, now)
        if trouble:
            parts.append(trouble)
        lines.append(" ".join(parts))
    last = report.get("last_error")
    if last:
        lines.append(
            f"  last error {last['at']} ({ago(last['at'], now)}) task {last['task_id']} "
            f"instance {last['instance']}: " + style(str(last["error"]), "red")
        )
    for problem in report.get("problems") or []:
        lines.append(style(f"  ! {problem}", "red" if status == "down" else "yellow"))
    return "\n".join(lines)


def render_task(task: dict[str, Any]) -> str:
    """One task for `evomsgd tasks show`."""
    lines = [
        f"{task['task_id']}  {task['status']}  instance {task['instance']}  phone {task['phone']}",
        f"  created {task['created_at']}  attempts {task['attempts']}  expires {task['expires_at']}",
    ]
    media = task.get("media")
    if media:
        what = f"{media['size']} bytes" if media.get("size") is not None else media.get("url")
        lines.append(
            f"  media {media['type']} {media.get('filename') or '-'} "
            f"({media.get('mimetype') or 'type unknown'}, {what})"
        )
    result = task.get("result") or {}
    if result.get("evolution_key"):
        lines.append(f"  evolution key {result['evolution_key']}  jid {result.get('remote_jid')}")
    if task.get("last_error"):
        lines.append(f"  last error: {task['last_error']}")
    delivery = task.get("delivery")
    if delivery:
        steps = [
            f"{name} {delivery[f'{name}_at']}"
            for name in ("server_ack", "delivered", "read", "played", "failed", "unconfirmed")
            if delivery.get(f"{name}_at")
        ]
        lines.append(
            f"  delivery {delivery['state']}" + (f"  ({', '.join(steps)})" if steps else "")
        )
        if delivery.get("error"):
            lines.append(f"  delivery error: {delivery['error']}")
        if delivery.get("note"):
            lines.append(f"  delivery: {delivery['note']}")
    for event in task.get("history") or []:
        outcome = f" {event['outcome']}" if event.get("outcome") else ""
        status = f" HTTP {event['http_status']}" if event.get("http_status") else ""
        lines.append(
            f"  {event['at']}  {event['event']}{outcome}{status}  {event.get('detail') or ''}".rstrip()
        )
    return "\n".join(lines)


def render_list(tasks: list[dict[str, Any]]) -> str:
    """A table for `evomsgd tasks list`; every value whole, a column as wide as its longest."""
    if not tasks:
        return "no tasks"
    # A JID or an instance cut short is a different recipient or instance to the reader (and
    # to `--phone` pasted from it), so the columns grow instead of cutting.
    instance_width = max(14, *(len(t["instance"]) for t in tasks))
    phone_width = max(16, *(len(t["phone"]) for t in tasks))
    rows = [
        f"{'TASK ID':<36}  {'STATUS':<9}  {'INSTANCE':<{instance_width}}  "
        f"{'PHONE':<{phone_width}}  CREATED"
    ]
    for t in tasks:
        rows.append(
            f"{t['task_id']:<36}  {t['status']:<9}  {t['instance']:<{instance_width}}  "
            f"{t['phone']:<{phone_width}}  {t['created_at']}"
        )
    return "\n".join(rows)
