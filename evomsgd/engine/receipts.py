"""Delivery receipts: Evolution's webhooks become delivery states, lane health and pauses.

`parse` is pure: one webhook body in, what it says out. `Receipts` writes what it says through
the group committer - a receipt is applied in the transaction that stores it, so the 200 the
webhook gets means "on disk" - tells the dispatcher about connection changes and pauses an
instance whose messages WhatsApp keeps rejecting. `sweep` (run every few seconds by `run`) marks
accepted messages that got no server ack in time as unconfirmed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine.dispatcher import Dispatcher
from evomsgd.errors import StoreUnavailable
from evomsgd.evolution.client import EvolutionClient, Sender
from evomsgd.evolution.lookups import WebhookConfig
from evomsgd.evolution.outcomes import InstanceState, StateProbe
from evomsgd.ledger import receipts as ledger
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.records import Receipt, ReceiptResult
from evomsgd.ledger.store import Store
from evomsgd.log import log_fields
from evomsgd.models import Delivery

log = logging.getLogger("evomsgd.receipts")

SECRET_PREFIX = "whk_"  # recognisable in a leak, like API tokens' evm_
SECRET_HEADER = "x-evomsgd-secret"
SECRET_CACHE_TTL = 1.0  # a new secret (evomsgd webhook setup) works within this many seconds
# A receipt waits this long for its send's outcome before it is dropped as not ours.
PENDING_TTL = 600.0
SWEEP_EVERY = 5.0
# findStatusMessage look-ups per sweep, all instances together: a message is asked about once,
# just before it would be marked unconfirmed, so this only bounds a burst of stuck messages.
LOOKUPS_PER_SWEEP = 20

# Evolution's `status` of a messages.update (renderStatus.ts), by name and by Baileys' number.
_STATUSES: dict[str, Delivery | None] = {
    "ERROR": Delivery.FAILED,
    "PENDING": None,  # what the 201 said already
    "SERVER_ACK": Delivery.SERVER_ACK,
    "DELIVERY_ACK": Delivery.DELIVERED,
    "READ": Delivery.READ,
    "PLAYED": Delivery.PLAYED,
}
_NUMBERED = ("ERROR", "PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED")
# connection.update states that change a lane; `connecting` is Baileys reconnecting on its own.
_CONNECTION: dict[str, InstanceState] = {
    "open": InstanceState.OPEN,
    "close": InstanceState.CLOSE,
    "refused": InstanceState.CLOSE,
}


@dataclass(frozen=True, slots=True)
class Webhook:
    """What one webhook body says: its event, instance, receipts and connection state."""

    event: str
    instance: str | None
    receipts: tuple[tuple[str, Delivery], ...] = ()  # (evolution key, state)
    connection: InstanceState | None = None
    status_reason: Any = None


def parse(body: Any) -> Webhook:
    """Read Evolution's envelope leniently; anything unexpected is ignored, never an error."""
    if not isinstance(body, dict):
        return Webhook("", None)
    event = body.get("event")
    event = event.lower().replace("_", ".") if isinstance(event, str) else ""
    instance = body.get("instance")
    instance = instance if isinstance(instance, str) and 0 < len(instance) <= 100 else None
    data = body.get("data")
    if event == "messages.update":
        found = tuple(_receipts(data if isinstance(data, list) else [data]))
        return Webhook(event, instance, receipts=found)
    if event == "connection.update" and isinstance(data, dict):
        state = data.get("state")
        return Webhook(
            event,
            instance,
            connection=_CONNECTION.get(state) if isinstance(state, str) else None,
            status_reason=data.get("statusReason"),
        )
    return Webhook(event, instance)


def _receipts(items: Iterable[Any]) -> Iterator[tuple[str, Delivery]]:
    for item in items:
        if not isinstance(item, dict) or item.get("fromMe") is False:  # incoming: not ours
            continue
        key = item.get("keyId")
        if not isinstance(key, str) and isinstance(item.get("key"), dict):
            key = item["key"].get("id")
        status = item.get("status")
        if isinstance(status, int) and 0 <= status < len(_NUMBERED):
            status = _NUMBERED[status]
        state = _STATUSES.get(status) if isinstance(status, str) else None
        if isinstance(key, str) and 0 < len(key) <= 200 and state is not None:
            yield key, state


def new_secret() -> str:
    """A fresh webhook secret: 32 random bytes, URL-safe (it may travel as a path segment)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The hex SHA-256 the ledger keeps instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8", "backslashreplace")).hexdigest()


def make_secret(store: Store) -> str:
    """Make a new webhook secret and keep its hash (the previous one stops working); returns it."""
    secret = new_secret()
    ledger.set_secret(store, digest(secret), clock.now())
    return secret


# -- evomsgd webhook setup ---------------------------------------------------------------------

WEBHOOK_PATH = "/webhooks/evolution"
V1_KEY_SEGMENT = "/key/"  # v1 servers send no custom headers: the secret rides in the path


@dataclass(frozen=True, slots=True)
class SetupResult:
    """What `webhook setup` did for one instance; `line` never holds the secret."""

    instance: str
    ok: bool
    line: str


def hook_url(base: str, secret: str | None, api_version: int) -> str:
    """The URL Evolution is given: v2 `{base}/webhooks/evolution`, v1 with the secret in it
    (`secret` None: the same with a placeholder, for printing)."""
    url = base.rstrip("/") + WEBHOOK_PATH
    if api_version == 1:
        url += V1_KEY_SEGMENT + (secret if secret is not None else "<secret>")
    return url


def presented_secret(config: WebhookConfig) -> str | None:
    """The secret a configured webhook sends evomsgd: the header, or v1's path segment."""
    if SECRET_HEADER in config.headers:
        return config.headers[SECRET_HEADER]
    _, sep, tail = config.url.partition(WEBHOOK_PATH + V1_KEY_SEGMENT)
    return tail.split("/", 1)[0] or None if sep else None


def points_at_us(config: WebhookConfig, ours: str | None) -> bool:
    """True when `config` sends evomsgd's secret (compared with its hash `ours`)."""
    secret = presented_secret(config)
    return ours is not None and secret is not None and hmac.compare_digest(ours, digest(secret))


def shown_url(url: str) -> str:
    """A configured URL as it may be printed: a v1 path secret is hidden."""
    head, sep, _ = url.partition(WEBHOOK_PATH + V1_KEY_SEGMENT)
    return head + WEBHOOK_PATH + V1_KEY_SEGMENT + "<secret>" if sep else url


async def setup_webhooks(
    client: EvolutionClient,
    store: Store,
    instances: list[str],
    base: str,
    *,
    replace: bool,
    relay_for: Callable[[str], str | None] = lambda _name: None,
) -> list[SetupResult]:
    """Point each instance's one Evolution webhook at evomsgd. Reads every instance's current
    webhook first; if any sends elsewhere (and not `replace`, nor relayed: `relay_for` gives that
    URL) nothing is changed. The secret is reused when a configured instance already presents it
    (only its hash is kept, so a new one would cut off instances set up before), else made anew."""
    found = await asyncio.gather(*(client.find_webhook(name) for name in instances))
    ours = await asyncio.to_thread(ledger.secret_digest, store)
    refusals: list[SetupResult] = []
    relayed: dict[str, str] = {}
    secret: str | None = None
    target = base.rstrip("/") + WEBHOOK_PATH
    for name, answer in zip(instances, found, strict=True):
        if not answer.ok:
            refusals.append(SetupResult(name, False, f"instance {name}: {answer.reason}"))
            continue
        config: WebhookConfig | None = answer.data
        if config is None or not config.enabled:
            continue
        if points_at_us(config, ours):
            secret = secret or presented_secret(config)
        elif relay_for(name) == config.url:
            relayed[name] = config.url  # that app keeps everything: evomsgd forwards it
        elif not replace and not config.url.startswith(target):
            refusals.append(
                SetupResult(
                    name,
                    False,
                    f"instance {name}: Evolution already sends its webhooks to "
                    f"{shown_url(config.url)} (one webhook per instance) - not changed; pass "
                    f"--replace to point it at {hook_url(base, None, client.api_version)}"
                    f', or keep that app listening: set relay_url = "{shown_url(config.url)}" in '
                    f"[instances.{name}] (or EVOMSGD_RELAY_URL) and evomsgd forwards every "
                    "webhook to it",
                )
            )
    if refusals:
        return refusals
    if secret is None:
        secret = await asyncio.to_thread(make_secret, store)
    headers = {SECRET_HEADER: secret} if client.api_version == 2 else {}
    url = hook_url(base, secret, client.api_version)
    shown = hook_url(base, None, client.api_version)
    done = await asyncio.gather(*(client.set_webhook(name, url, headers) for name in instances))
    return [
        SetupResult(
            name,
            True,
            f"instance {name}: receipts configured ({shown})"
            + (
                f"; its webhooks are relayed to {shown_url(relayed[name])}"
                if name in relayed
                else ""
            ),
        )
        if answer.ok
        else SetupResult(name, False, f"instance {name}: {answer.reason}")
        for name, answer in zip(instances, done, strict=True)
    ]


def pause_reason(count: int, instance: str) -> str:
    """The operator pause's reason when WhatsApp keeps rejecting an instance's messages."""
    return (
        f"WhatsApp rejected {count} messages of instance {instance} within 10 minutes "
        "(delivery status ERROR; EVOMSGD_DELIVERY_ERRORS_PAUSE) - check in WhatsApp on its "
        "phone that the number is not restricted or banned and that the recipients exist, "
        f"then `evomsgd resume {instance}`"
    )


class Receipts:
    """Turns webhook bodies into ledger writes and lane changes; see the module's docstring."""

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        dispatcher: Dispatcher,
        settings: Settings,
        *,
        sender: Sender | None = None,
        time_source: Callable[[], float] = clock.now,
        on_receipt: Callable[[str, str, float | None], None] | None = None,
    ) -> None:
        self.store = store
        self._sender = sender
        self.committer = committer
        self.dispatcher = dispatcher
        self.settings = settings
        self._time = time_source
        self._on_receipt = on_receipt
        self._digest: str | None = None
        self._read_at = -float("inf")
        self.dropped = 0  # receipts for messages evomsgd did not send, since start

    # -- the secret ---------------------------------------------------------------------

    async def authentic(self, presented: str | None) -> bool:
        """True when `presented` is the webhook secret (compared in constant time)."""
        if time.monotonic() - self._read_at >= SECRET_CACHE_TTL:
            self._digest = await asyncio.to_thread(ledger.secret_digest, self.store)
            self._read_at = time.monotonic()
        if self._digest is None or not presented:
            return False
        return hmac.compare_digest(self._digest, digest(presented))

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, body: Any) -> str:
        """Store and apply one webhook body; returns what was done, in one word. The caller
        answers 200 only after this returns: what it applied is committed."""
        hook = parse(body)
        if hook.instance is None:
            return "ignored"
        now = self._time()
        instance = hook.instance
        if hook.receipts:
            found = [Receipt(instance, key, state.value, now) for key, state in hook.receipts]
            results = await asyncio.wrap_future(
                self.committer.write(lambda cur: self._apply_in(cur, found, now))
            )
            for result in results:
                self._counted(instance, result)
            return ",".join(sorted({result.outcome for result in results}))
        if hook.event in ("send.message", "connection.update"):
            await asyncio.wrap_future(
                self.committer.write(lambda cur: ledger.heard_in(cur, instance, now))
            )
        if hook.connection is not None:
            reason = (
                f"Evolution reported instance {instance} {hook.connection.value}"
                f" (statusReason {hook.status_reason}) - pair it again in Evolution's manager"
                if hook.connection is not InstanceState.OPEN
                else f"Evolution reported instance {instance} open"
            )
            self.dispatcher.reported_state(
                instance, StateProbe(hook.connection, None, reason, None)
            )
            return "state"
        return "heard" if hook.event == "send.message" else "ignored"

    def _apply_in(self, cur: Any, found: list[Receipt], now: float) -> list[ReceiptResult]:
        results = [ledger.apply_in(cur, receipt) for receipt in found]
        threshold = self.settings.delivery_errors_pause
        failures = max((result.recent_failures for result in results), default=0)
        if threshold and failures >= threshold:
            instance = found[0].instance
            if ledger.pause_in(cur, instance, pause_reason(failures, instance), now):
                results.append(ReceiptResult("applied", None, "paused", failures))
        return results

    def _counted(self, instance: str, result: ReceiptResult) -> None:
        if result.delivery == "paused":
            reason = pause_reason(result.recent_failures, instance)
            self.dispatcher.set_operator_pause(instance, True, reason)
            log.error(
                "instance %s paused: %s", instance, reason, extra=log_fields(instance=instance)
            )
            return
        if result.outcome == "dropped":
            self.dropped += 1
        label = result.delivery if result.outcome == "applied" else result.outcome
        if self._on_receipt is not None and label is not None:
            self._on_receipt(instance, label, result.since_accepted)
        if result.outcome == "applied" and result.delivery == Delivery.FAILED:
            log.warning(
                "task %s instance %s: WhatsApp reported the message failed (delivery ERROR)",
                result.message_id,
                instance,
                extra=log_fields(result.message_id, instance),
            )

    # -- stuck messages -----------------------------------------------------------------

    def sweep(self, now: float) -> list[tuple[str, str]]:
        """Mark accepted messages without a server ack for EVOMSGD_ACK_TIMEOUT unconfirmed, and
        drop receipts that waited too long for their send; returns the (id, instance) marked."""
        timeout = self.settings.ack_timeout

        def op(cur: Any) -> tuple[list[tuple[str, str]], int]:
            # An EVOLUTION-channel instance never sends a receipt: waiting for one is no sign
            # of trouble, so its messages stay accepted ("no receipts on this instance").
            silent = ledger.silent_instances_in(cur)
            marked = ledger.mark_unconfirmed_in(cur, now, timeout, silent)
            return marked, ledger.drop_pending_in(cur, now - PENDING_TTL)

        marked, dropped = self.committer.write(op).result()
        self.dropped += dropped
        for message_id, instance in marked:
            if self._on_receipt is not None:
                self._on_receipt(instance, Delivery.UNCONFIRMED.value, None)
            log.warning(
                "task %s instance %s: no WhatsApp server ack %gs after Evolution took it "
                "(delivery unconfirmed)",
                message_id,
                instance,
                timeout,
                extra=log_fields(message_id, instance),
            )
        return marked

    async def look_up_stuck(self, now: float) -> int:
        """For instances without webhooks, ask Evolution (`findStatusMessage`) about messages the
        sweep would mark unconfirmed, and apply what it stored; returns how many moved."""
        if self._sender is None:
            return 0
        stuck = await asyncio.to_thread(
            ledger.stuck_without_webhooks,
            self.store,
            now,
            self.settings.ack_timeout,
            LOOKUPS_PER_SWEEP,
        )
        found: list[Receipt] = []
        for _, instance, key, jid in stuck:
            answer = await self._sender.find_status(instance, key, jid)
            state = _STATUSES.get(answer.data) if answer.ok and answer.data else None
            if state is not None:
                found.append(Receipt(instance, key, state.value, now))
        moved = 0
        for receipt in found:  # one at a time: the delivery-error pause counts per instance
            results = await asyncio.wrap_future(
                self.committer.write(functools.partial(self._apply_in, found=[receipt], now=now))
            )
            for result in results:
                self._counted(receipt.instance, result)
                moved += result.outcome == "applied"
        return moved

    async def run(self) -> None:
        """Sweep every few seconds until cancelled (asking about stuck messages first)."""
        while True:
            try:
                await self.look_up_stuck(self._time())
                await asyncio.to_thread(self.sweep, self._time())
            except StoreUnavailable as exc:
                log.warning("receipts: sweep failed (%s); trying again", exc)
            except Exception:  # a bug here must not end the sweeps for the daemon's lifetime
                log.exception("receipts: sweep crashed; trying again")
            await asyncio.sleep(min(SWEEP_EVERY, self.settings.ack_timeout / 10))
