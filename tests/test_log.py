"""Logs under journald: no timestamps and a <N> priority on every line, tracebacks included."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from evomsgd import log

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() replaces the root handlers: give them back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def journal_stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def _record(level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("evomsgd.test", level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_each_level_maps_to_its_syslog_priority(level: int, priority: int) -> None:
    line = log.JournalFormatter().format(_record(level, "hello"))
    assert line == f"<{priority}>evomsgd.test: hello"


def test_a_traceback_keeps_the_error_priority_on_every_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line of the message")
    except RuntimeError as exc:
        text = log.JournalFormatter().format(_record(logging.ERROR, "send failed", exc))
    lines = text.splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), text
    assert lines[0] == "<3>evomsgd.test: send failed"
    assert lines[-1] == "<3>second line of the message"
    assert not TIMESTAMP.search(text)


def test_configure_writes_journal_lines_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(path))
        assert log.under_journald(stream)
        log.configure("INFO", "text", stream)
        logging.getLogger("evomsgd.daemon").info("listening on %s", "http://127.0.0.1:8001")
        logging.getLogger("evomsgd.daemon").warning("SANDBOX MODE")
    assert path.read_text().splitlines() == [
        "<6>evomsgd.daemon: listening on http://127.0.0.1:8001",
        "<4>evomsgd.daemon: SANDBOX MODE",
    ]


@pytest.mark.parametrize("journal_stream", ["", "not-a-pair", "1:2"])
def test_anything_but_the_journal_gets_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None, journal_stream: str
) -> None:
    # JOURNAL_STREAM is inherited: a child whose stderr was redirected to a file must not
    # believe it still writes to the journal.
    path = tmp_path / "daemon.log"
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    with path.open("w") as stream:
        assert not log.under_journald(stream)
        log.configure("INFO", "text", stream)
        logging.getLogger("evomsgd.daemon").info("hello")
    line = path.read_text().strip()
    assert TIMESTAMP.search(line) and not line.startswith("<"), line
