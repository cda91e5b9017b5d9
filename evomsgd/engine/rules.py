"""The engine's pure rules: what a send outcome does to its message and lane (`decide`), and what
a state probe does to its lane (`probe_effect`). No I/O, no clock of their own."""

from __future__ import annotations

import random
from typing import Any

from evomsgd.config import Settings
from evomsgd.engine.jobs import Job, LaneEffect
from evomsgd.engine.lanes import Health
from evomsgd.evolution.outcomes import InstanceState, OutcomeKind, SendOutcome, StateProbe
from evomsgd.ledger.records import Message, Transition
from evomsgd.models import Status


def decide(
    msg: Message,
    outcome: SendOutcome,
    now: float,
    settings: Settings,
    rng: random.Random,
    job: Job | None = None,
) -> tuple[Transition, LaneEffect | None]:
    """The retry policy: what a send outcome does to the message and to its instance's lane."""
    kind = outcome.kind
    detail = outcome.reason
    if outcome.detail and outcome.detail not in detail:
        detail = f"{detail} (Evolution said: {outcome.detail})"

    def to(status: Status, text: str | None = detail, **changes: Any) -> Transition:
        return Transition(
            status, kind.value, text, outcome.http_status, error_kind=kind.value, **changes
        )

    if kind == OutcomeKind.SENT:
        sent = Transition(
            Status.SUCCESS,
            kind.value,
            None,
            outcome.http_status,
            evolution_key=outcome.key_id,
            remote_jid=outcome.remote_jid,
            integration=outcome.integration,
        )
        return sent, LaneEffect(health=Health.OPEN)
    if kind == OutcomeKind.FOUND:
        # An earlier attempt sent it; nothing was sent now. One copy at Evolution: the
        # ambiguity is resolved, not a duplicate (error_kind "found" says so to the result).
        found = Transition(
            Status.SUCCESS,
            kind.value,
            detail,
            outcome.http_status,
            evolution_key=outcome.key_id,
            remote_jid=outcome.remote_jid,
            error_kind=kind.value if outcome.copies == 1 else None,
        )
        return found, None
    if kind == OutcomeKind.SENT_UNCONFIRMED:
        return to(Status.SUCCESS), None  # WhatsApp has it: resending would duplicate it
    if kind == OutcomeKind.UNKNOWN_INSTANCE and job is not None and job.instance_known:
        # It sent before, so it was deleted: people delete and re-create an instance to pair it
        # again. The lane waits out EVOMSGD_UNKNOWN_INSTANCE_GRACE; the message keeps its place.
        return to(Status.RETRY, next_attempt_at=now), LaneEffect(
            health=Health.UNKNOWN_INSTANCE, reason=detail
        )
    if kind in (OutcomeKind.PERMANENT, OutcomeKind.UNKNOWN_INSTANCE):
        ttl = settings.not_on_whatsapp_ttl
        if outcome.not_on_whatsapp and ttl > 0:
            return to(Status.FAILURE, not_on_whatsapp_until=now + ttl), None
        return to(Status.FAILURE), None
    if kind == OutcomeKind.RATE_LIMITED:
        hold = settings.rate_limit_pause
        return to(Status.RETRY, next_attempt_at=now + hold), LaneEffect(
            hold_for=hold, reason=detail
        )
    if kind in (OutcomeKind.UPSTREAM_DOWN, OutcomeKind.CONFIG_ERROR):
        # Not the message's fault: it waits, without spending retries, until the lane resumes.
        if kind == OutcomeKind.CONFIG_ERROR:
            health = Health.CONFIG_ERROR
        elif outcome.instance_state == InstanceState.CLOSE:
            health = Health.CLOSE  # Evolution is up; the instance is not paired
        else:
            health = Health.DOWN
        return to(Status.RETRY, next_attempt_at=now), LaneEffect(health=health, reason=detail)
    if kind == OutcomeKind.AMBIGUOUS:
        earlier = msg.ambiguous - msg.recovered  # a resend owed after a crash does not count
        if earlier < settings.ambiguous_retries:
            text = f"{detail} - it may have been delivered; one more try in {settings.ambiguous_delay:g}s"
            return to(
                Status.RETRY, text, next_attempt_at=now + settings.ambiguous_delay, ambiguous=True
            ), None
        text = f"{detail} - it may have been delivered; not sent again to avoid a duplicate"
        return to(Status.FAILURE, text, ambiguous=True), None
    # TRANSIENT: spend the retry budget.
    if msg.retries_used < settings.max_retries:
        delay = settings.retry_delay * settings.retry_backoff**msg.retries_used
        if settings.retry_jitter:
            delay += rng.uniform(0.0, settings.retry_jitter)
        return to(Status.RETRY, next_attempt_at=now + delay, spend_retry=True), None
    return to(
        Status.FAILURE, f"gave up after {msg.attempts} attempts: {detail}", spend_retry=True
    ), None


def probe_effect(probe: StateProbe, instance_known: bool) -> LaneEffect | None:
    """What a state probe's answer does to its lane (None: nothing)."""

    def effect(health: Health | None) -> LaneEffect:
        return LaneEffect(health=health, reason=probe.reason, from_probe=True)

    if probe.kind is None:
        if probe.state == InstanceState.OPEN:
            return LaneEffect(health=Health.OPEN, from_probe=True)
        if probe.state in (InstanceState.CLOSE, InstanceState.CONNECTING):
            return effect(Health.CLOSE)
        return None
    if probe.kind == OutcomeKind.UPSTREAM_DOWN:
        return effect(Health.DOWN)
    if probe.kind == OutcomeKind.CONFIG_ERROR:
        return effect(Health.CONFIG_ERROR)
    if probe.kind == OutcomeKind.UNKNOWN_INSTANCE:
        # A name never seen sending is not paused: each send fails at once with a clear reason.
        return effect(Health.UNKNOWN_INSTANCE if instance_known else None)
    return None
