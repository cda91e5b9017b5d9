"""Schemathesis against /openapi.json of a real `evomsgd serve --sandbox` that has a token.

Every operation gets valid and invalid requests; none may answer 5xx, and every answer must
match the status codes and schemas the document promises.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import free_port
from tests.test_e2e import Daemon
from tests.test_security_e2e import evomsgd

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
# Operations without parameters (GET /, /health, /instances) have one possible request, and
# negative cases exist only where the schema constrains something; the rest share the load.
EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 300, schemathesis.GenerationMode.NEGATIVE: 150}
MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    created = evomsgd("token", "create", "fuzz", EVOMSGD_DATA_DIR=str(data_dir))
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    daemon = Daemon(
        data_dir,
        free_port(),
        "--sandbox",
        "--instance",
        "main",
        token=token,
        EVOMSGD_SEND_INTERVAL="0",
    )
    yield daemon
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.logs()


def test_every_operation_answers_as_documented(daemon: Daemon) -> None:
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(daemon.url + "/openapi.json")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {daemon.token}"
    # As every client does (the CLI too): the daemon takes POST/DELETE only as JSON.
    session.headers["Content-Type"] = "application/json"
    calls: Counter[str] = Counter()
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                calls[case.operation.label] += 1
                case.call_and_validate(session=session, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # report every operation's failures
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:3000]
    total = sum(calls.values())
    print(f"schemathesis: {total} requests in {time.monotonic() - started:.1f}s: {dict(calls)}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert {op.label for op in operations} == set(calls)
    assert total >= MIN_REQUESTS, calls
