"""Log lines of a real daemon: JSON for shippers, with task_id and instance as fields."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from evomsgd import log
from tests.conftest import free_port, wait_until
from tests.test_e2e import Daemon, request


@pytest.mark.slow
def test_json_lines_carry_task_id_and_instance(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path / "data",
        free_port(),
        "--sandbox",
        "--instance",
        "shop",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        EVOMSGD_SEND_INTERVAL="0",
    )
    try:
        ids = []
        for instance in ("shop", "clinic"):
            status, body = request(
                daemon.url + "/messages",
                {"phone": "+5215512345678", "message": "hola", "instance_name": instance},
            )
            assert status == 202, body
            ids.append((body["task_id"], instance))
        request(daemon.url + "/instances/clinic/pause", {}, "POST")
        request(daemon.url + "/instances/clinic/resume", {}, "POST")
        for task_id, _ in ids:
            wait_until(
                lambda t=task_id: request(f"{daemon.url}/tasks/{t}")[1]["status"] == "SUCCESS",
                10,
                f"{task_id} sent",
            )
    finally:
        assert daemon.stop() == 0
    entries = [json.loads(line) for line in daemon.logs().splitlines() if line.strip()]
    assert {"ts", "level", "logger", "msg"} <= set(entries[0])
    seen: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        about_task = re.match(r"task (\S+) instance (\S+): (\w+)", entry["msg"])
        if about_task:
            task_id, instance, what = about_task.groups()
            assert (entry["task_id"], entry["instance"]) == (task_id, instance), entry
            seen.setdefault(task_id, []).append((entry["level"], what))
        elif entry["msg"].startswith("instance "):
            assert entry["instance"] == entry["msg"].split()[1].rstrip(":"), entry
        else:
            assert "task_id" not in entry, entry
    # At INFO (the default) a delivered message logs one line; the rest is DEBUG. Three lines
    # per message would hit journald's rate limit at ~110 messages/s.
    assert {task_id: seen[task_id] for task_id, _ in ids} == {
        task_id: [("debug", "accepted"), ("debug", "sending"), ("info", "sent")]
        for task_id, _ in ids
    }
    assert any(e["msg"] == "instance clinic paused: paused by an operator" for e in entries)


def test_text_lines_keep_task_and_instance_in_the_message() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    log.configure("INFO", "text", stream)
    try:
        logging.getLogger("evomsgd.test").info(
            "task %s instance %s: sent", "t-1", "shop", extra=log.log_fields("t-1", "shop")
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert stream.getvalue().rstrip().endswith("INFO    evomsgd.test: task t-1 instance shop: sent")
