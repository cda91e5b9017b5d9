"""Logging set up once at the entry point: text for terminals and journald, or JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

# syslog priorities journald understands as a "<N>" line prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_journald(stream: TextIO = sys.stderr) -> bool:
    """True when stderr is connected to journald ($JOURNAL_STREAM names its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def log_fields(task_id: str | None = None, instance: str | None = None) -> dict[str, str]:
    """`extra=` for a line about a message or an instance: JSON lines carry them as fields."""
    fields = {}
    if task_id is not None:
        fields["task_id"] = task_id
    if instance is not None:
        fields["instance"] = instance
    return fields


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds its own) and a priority prefix on every line of a record,
    so a traceback stays one entry per line at the record's priority instead of dropping to info."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("task_id", "instance"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    elif under_journald(stream):
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Huey announces every registered task and each consumer start at INFO: keep it quieter.
    logging.getLogger("huey").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
