"""A dispatcher over a real ledger, driven one step at a time with a controllable clock.

No threads and no sleeps: `step()` is one pass of the dispatcher's loop (claims included), the
jobs it hands out are collected in `jobs`, and `attempt()` plays a worker - an outcome, the ledger
write, the report back - the way `engine.delivery.Delivery` does, with the same rules (`decide`).
"""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomsgd import ids
from evomsgd.engine.dispatcher import Dispatcher
from evomsgd.engine.jobs import Finished, Job
from evomsgd.engine.rules import decide
from evomsgd.evolution.outcomes import InstanceState, OutcomeKind, SendOutcome, StateProbe
from evomsgd.ledger.records import Message, NewMessage
from evomsgd.ledger.store import Store
from evomsgd.models import FINAL, Status
from tests.conftest import fast_settings

T0 = 1_800_000_000.0

SENT = SendOutcome(OutcomeKind.SENT, "handed to WhatsApp (201)", 201, "3EB0KEY", "x@s.whatsapp.net")
TRANSIENT = SendOutcome(OutcomeKind.TRANSIENT, "Evolution server error (500) - retry later", 500)
DOWN = SendOutcome(OutcomeKind.UPSTREAM_DOWN, "cannot connect to Evolution - is it running?")
OPEN = StateProbe(InstanceState.OPEN, None, "instance main is connected to WhatsApp", 200)


class Stepper:
    def __init__(
        self,
        data_dir: Path,
        now: float = T0,
        busy: Callable[[], bool] = lambda: False,
        **settings: Any,
    ) -> None:
        self.now = now
        self.settings = fast_settings(**settings)
        self.store = Store(data_dir, durability="normal")
        self.jobs: list[Job] = []
        self.rng = random.Random(0)
        self.probe_answer = OPEN  # what a state probe of any instance answers
        self.probes: list[str] = []
        self.dispatcher = Dispatcher(
            self.store,
            self.settings,
            self.jobs.extend,
            self._probe,
            time_source=lambda: self.now,
            rng=random.Random(0),
            busy=busy,
        )
        self.dispatcher.reload_lanes()
        self.started: list[str] = []  # message ids in the order their attempts started

    def _probe(self, instance: str) -> concurrent.futures.Future[StateProbe]:
        self.probes.append(instance)
        future: concurrent.futures.Future[StateProbe] = concurrent.futures.Future()
        future.set_result(self.probe_answer)  # answered at once: applied within the same step
        return future

    def close(self) -> None:
        self.store.close()

    def accept(
        self,
        phone: str,
        *,
        priority: int = 0,
        instance: str = "main",
        send_at: float | None = None,
        expires_in: float = 86_400.0,
    ) -> str:
        """Queue one message as the API would (already normalised), and wake its lane."""
        new = NewMessage(
            id=ids.task_id(self.now),
            instance=instance,
            phone=phone,
            phone_input=phone,
            text=f"text for {phone}",
            priority=priority,
            created_at=self.now,
            send_at=send_at,
            expires_at=self.now + expires_in,
            sandbox=False,
        )
        self.store.insert_messages([new])
        self.dispatcher.accepted({instance: 1})
        return new.id

    def step(self) -> float:
        return self.dispatcher.step()

    def take(self) -> list[Job]:
        """The jobs handed out since the last call."""
        jobs, self.jobs[:] = list(self.jobs), []
        return jobs

    def attempt(self, job: Job, outcome: SendOutcome) -> Message:
        """Play a worker: the dispatcher claimed the message; record `outcome` under the rules
        and report back."""
        msg = job.message
        assert msg is not None, f"{job.message_id} was handed out unclaimed"
        self.started.append(msg.id)
        transition, effect = decide(msg, outcome, self.now, self.settings, self.rng, job)
        assert self.store.finish_attempt(msg, job.started, self.now, transition)
        sent = transition.status is Status.SUCCESS
        if sent and not job.instance_known:
            self.store.mark_sent_once(msg.instance, self.now)  # as Delivery._first_send does
        self.dispatcher.finished(Finished(job, transition.status in FINAL, effect, sent))
        row = self.store.get(msg.id)
        assert row is not None
        return row
