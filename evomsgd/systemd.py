"""systemd's notify protocol (sd_notify(3)) without libsystemd: newline-separated KEY=VALUE
fields in one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET. Outside systemd every call
is a no-op."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Mapping

log = logging.getLogger("evomsgd.systemd")

# systemd gives a stopping service this much time on top of the drain before SIGKILL.
STOP_MARGIN = 15.0


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send fields such as "READY=1" to $NOTIFY_SOCKET; False when there is none or it fails."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock: for VMs, not services)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc.strerror or exc)
        return False
    return True


def ready(status: str) -> None:
    """Tell systemd the daemon serves: recovery done, workers started, socket listening."""
    notify("READY=1", f"STATUS={status}")


def stopping(drain_timeout: float) -> None:
    """Tell systemd we are draining, and that it may take up to the drain timeout (plus margin)."""
    usec = int((drain_timeout + STOP_MARGIN) * 1_000_000)
    notify(
        "STOPPING=1", f"STATUS=draining (at most {drain_timeout:g}s)", f"EXTEND_TIMEOUT_USEC={usec}"
    )


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of WatchdogSec=), or None if no watchdog is ours.

    systemd sets WATCHDOG_PID to the main PID. A single-file build runs this code in a child of
    its bootloader, which is that main PID: the watchdog is ours when WATCHDOG_PID names us or,
    frozen, our parent."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    ours = pid in (0, os.getpid()) or (pid == os.getppid() and getattr(sys, "frozen", False))
    return usec / 2_000_000 if ours else None


async def watchdog(interval: float) -> None:
    """Ping from the event loop itself: a loop stuck for WatchdogSec gets the service restarted."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
