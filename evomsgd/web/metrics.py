"""GET /metrics: counters fed by the delivery hook, ledger gauges read at scrape time.

Each app has its own CollectorRegistry, so a process (a test run) can hold many apps. Counters
count events as they happen in this process; gauges that describe the ledger are computed by
`LedgerCollector` during the scrape, which runs in a thread because it reads SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from evomsgd import __version__, clock
from evomsgd.config import Settings
from evomsgd.errors import StoreUnavailable
from evomsgd.evolution.outcomes import OutcomeKind, SendOutcome
from evomsgd.ledger import callbacks as ledger_callbacks
from evomsgd.ledger import receipts
from evomsgd.ledger.records import Message, Transition
from evomsgd.ledger.store import Store
from evomsgd.models import WAITING, LaneView, ReplicationView, Status
from evomsgd.web import routes
from evomsgd.web.routes import Route

log = logging.getLogger("evomsgd.metrics")

LanesView = Callable[[], list[LaneView]]

# Not `instance`: Prometheus gives that label to the scraped target and would rename ours.
LABEL = "evolution_instance"

# The words of Lane.state(); each instance reports 1 for its current state and 0 for the others.
LANE_STATES = ("sending", "idle", "paused", "held", "close", "down", "config_error")
# The error kinds a message can end in FAILURE with (see delivery.decide), pre-created at zero so
# that rate() sees the first failure of a fresh daemon.
FAILURE_KINDS = (
    OutcomeKind.PERMANENT,
    OutcomeKind.UNKNOWN_INSTANCE,
    OutcomeKind.TRANSIENT,
    OutcomeKind.AMBIGUOUS,
)
# From a paced lane's one-second gap up to a message that waited out a day-long outage.
LATENCY_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600, 86400)
# Evolution answers in well under a second, except WhatsApp's number lookup (up to about 60 s).
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90)


class Metrics:
    """One app's metrics: the hooks the engine calls, and the registry /metrics renders.

    Construction reads the ledger (where expiry counting starts): build it in a thread.
    """

    def __init__(self, store: Store, lanes: LanesView, settings: Settings) -> None:
        # Without this every counter and histogram carries a second `_created` series per label
        # set; Prometheus does not need them and they double the series count.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        reg = self.registry
        self.accepted = Counter(
            "evomsgd_messages_accepted",
            "Messages written to the ledger by POST /messages.",
            [LABEL],
            registry=reg,
        )
        self.sent = Counter(
            "evomsgd_messages_sent",
            "Messages Evolution accepted (SUCCESS).",
            [LABEL],
            registry=reg,
        )
        self.failed = Counter(
            "evomsgd_messages_failed",
            "Messages that ended in FAILURE, by the kind of their last error.",
            [LABEL, "error_kind"],
            registry=reg,
        )
        self.retried = Counter(
            "evomsgd_messages_retried",
            "Failed attempts after which the message waits for another try, by error kind.",
            [LABEL, "error_kind"],
            registry=reg,
        )
        self.receipts = Counter(
            "evomsgd_receipts",
            "Delivery receipts from Evolution's webhooks, by the delivery state they moved a "
            "message to (server_ack, delivered, read, played, failed, unconfirmed) or stale, "
            "pending (before its send's outcome), dropped (not a message evomsgd sent).",
            [LABEL, "state"],
            registry=reg,
        )
        self.to_delivered = Histogram(
            "evomsgd_accept_to_delivered_seconds",
            "From acceptance to WhatsApp's delivery receipt (DELIVERY_ACK) of the message.",
            [LABEL],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.to_read = Histogram(
            "evomsgd_accept_to_read_seconds",
            "From acceptance to the recipient's read receipt (READ) of the message.",
            [LABEL],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.latency = Histogram(
            "evomsgd_accept_to_sent_seconds",
            "From acceptance (or send_at, when later) to Evolution's acceptance of the message.",
            [LABEL],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.call = Histogram(
            "evomsgd_evolution_call_seconds",
            "Duration of one send call to Evolution, by outcome.",
            [LABEL, "outcome"],
            buckets=CALL_BUCKETS,
            registry=reg,
        )
        Info("evomsgd_build", "The running evomsgd.", registry=reg).info(
            {"version": __version__, "sandbox": str(settings.sandbox).lower()}
        )
        ProcessCollector(registry=reg)
        known = {*settings.instances, *filter(None, [settings.instance_fallback])}
        for instance in known:
            self.accepted.labels(instance)
            self.sent.labels(instance)
            for kind in FAILURE_KINDS:
                self.failed.labels(instance, kind.value)
        self.ledger = LedgerCollector(store, lanes, known)
        reg.register(self.ledger)

    def count_accepted(self, per_instance: Mapping[str, int]) -> None:
        """The committer's hook: messages newly written, per instance (replays excluded)."""
        for instance, count in per_instance.items():
            self.accepted.labels(instance).inc(count)

    def on_receipt(self, instance: str, state: str, since_accepted: float | None) -> None:
        """The receipts' hook: one receipt, what it did (a delivery state, stale, ...) and, when
        it moved a message, how long after its acceptance."""
        self.receipts.labels(instance, state).inc()
        if since_accepted is None:
            return
        if state == "delivered":
            self.to_delivered.labels(instance).observe(since_accepted)
        elif state == "read":
            self.to_read.labels(instance).observe(since_accepted)

    def on_outcome(self, msg: Message, outcome: SendOutcome, transition: Transition) -> None:
        """Delivery's hook, in a worker thread once the attempt is recorded."""
        self.call.labels(msg.instance, outcome.kind.value).observe(outcome.elapsed)
        kind = transition.error_kind or outcome.kind.value
        if transition.status is Status.SUCCESS:
            self.sent.labels(msg.instance).inc()
            due = max(msg.created_at, msg.send_at or "")  # ledger times sort as text
            self.latency.labels(msg.instance).observe(max(0.0, clock.now() - clock.from_db(due)))
        elif transition.status is Status.FAILURE:
            self.failed.labels(msg.instance, kind).inc()
        elif transition.status is Status.RETRY:
            self.retried.labels(msg.instance, kind).inc()


class LedgerCollector(Collector):
    """Gauges read from the ledger and the lanes at scrape time; call collect() off the event loop.

    Every query touches an index range, never the whole messages table: counts by status probe
    the (status, seq) index, waiting counts read only waiting rows, and expiries (which happen in
    the dispatcher, out of reach of the delivery hook) are counted from the events appended since
    the previous scrape.
    """

    def __init__(self, store: Store, lanes: LanesView, instances: Iterable[str]) -> None:
        self.store = store
        self.lanes = lanes
        self.instances = set(instances)
        self.started = time.monotonic()
        self._lock = threading.Lock()  # two scrapes at once must not count the same events twice
        self._expired: dict[str, int] = {}
        self._cursor = store.last_event_id()  # like every counter here, it counts from the start

    def collect(self) -> Iterator[Metric]:
        uptime = GaugeMetricFamily("evomsgd_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], time.monotonic() - self.started)
        yield uptime
        lanes = self.lanes()
        instances = self.instances | {lane.instance for lane in lanes}
        yield _lane_states(lanes)
        up = GaugeMetricFamily("evomsgd_ledger_up", "1 when this scrape could read the ledger.")
        try:
            counts = self.store.counts()
            deliveries = receipts.delivery_counts(self.store)
            waiting = self.store.waiting_breakdown()
            expired = self._count_expired()
        except StoreUnavailable as exc:
            log.warning("metrics: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _ledger_gauges(counts, waiting, instances | {row[0] for row in waiting})
        by_delivery = GaugeMetricFamily(
            "evomsgd_messages_delivery",
            "Sent messages in the ledger by delivery state (unconfirmed: no server ack within "
            "EVOMSGD_ACK_TIMEOUT).",
            labels=["state"],
        )
        for state, count in deliveries.items():
            by_delivery.add_metric([state], count)
        yield by_delivery
        total = CounterMetricFamily(
            "evomsgd_messages_expired",
            "Messages that expired before they could be sent.",
            labels=[LABEL],
        )
        for instance in sorted(instances | set(expired)):
            total.add_metric([instance], expired.get(instance, 0))
        yield total

    def _count_expired(self) -> dict[str, int]:
        with self._lock:
            upto = self.store.last_event_id()
            for instance, count in self.store.count_events("expired", self._cursor, upto).items():
                self._expired[instance] = self._expired.get(instance, 0) + count
            self._cursor = upto
            return dict(self._expired)


def _lane_states(lanes: list[LaneView]) -> Metric:
    family = GaugeMetricFamily(
        "evomsgd_instance_state",
        "1 for each instance's current lane state: sending, idle, paused, held, close, down"
        " or config_error.",
        labels=[LABEL, "state"],
    )
    for lane in lanes:
        current = lane.state
        for state in dict.fromkeys((*LANE_STATES, current)):
            family.add_metric([lane.instance, state], 1 if state == current else 0)
    return family


def _ledger_gauges(
    counts: Mapping[str, int],
    waiting: list[tuple[str, str, int, float | None]],
    instances: set[str],
) -> Iterator[Metric]:
    by_status = GaugeMetricFamily(
        "evomsgd_messages", "Messages in the ledger by status.", labels=["status"]
    )
    for status, count in counts.items():
        by_status.add_metric([status], count)
    yield by_status
    now = clock.now()
    per_lane: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    for instance, status, count, earliest in waiting:
        per_lane[(instance, status)] = count
        if earliest is not None:
            # The earliest next attempt, if past, is the message that has been due the longest.
            oldest[instance] = max(oldest.get(instance, 0.0), now - earliest)
    family = GaugeMetricFamily(
        "evomsgd_messages_waiting",
        "Messages waiting to be sent, by instance and status.",
        labels=[LABEL, "status"],
    )
    age = GaugeMetricFamily(
        "evomsgd_oldest_waiting_seconds",
        "How long the longest-waiting due message has been due (0 when none is due).",
        labels=[LABEL],
    )
    for instance in sorted(instances):
        for status in WAITING:
            family.add_metric([instance, status.value], per_lane.get((instance, status.value), 0))
        age.add_metric([instance], max(0.0, oldest.get(instance, 0.0)))
    yield family
    yield age


METRICS = web.AppKey("metrics", Metrics)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (text format, or OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encoder, request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


# Prometheus text, not JSON: outside the API document.
ROUTES = (Route("GET", "/metrics", metrics, None),)


def add_routes(app: web.Application) -> None:
    """Register GET /metrics."""
    routes.register(app, ROUTES)


# The states of ReplicationView.state; the current one reports 1, the others 0.
REPLICATION_STATES = ("starting", "replicating", "failing", "restarting")


class ReplicationCollector(Collector):
    """The ledger's Litestream replication, read from its supervisor at scrape time."""

    def __init__(self, view: Callable[[], ReplicationView]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        replica = self.view()
        state = GaugeMetricFamily(
            "evomsgd_replication_state",
            "1 for the replication's current state: starting, replicating, failing, restarting.",
            labels=["state"],
        )
        for name in REPLICATION_STATES:
            state.add_metric([name], 1 if name == replica.state else 0)
        yield state
        last = GaugeMetricFamily(
            "evomsgd_replication_last_sync_timestamp_seconds",
            "Unix time of the last successful upload to the replica (0 before the first).",
        )
        synced = replica.last_sync_at
        at = 0.0 if synced is None else datetime.fromisoformat(synced.replace("Z", "+00:00"))
        last.add_metric([], at if isinstance(at, float) else at.timestamp())
        yield last
        lag = GaugeMetricFamily(
            "evomsgd_replication_lag_seconds",
            "0 when the replica holds the newest local transaction, else seconds since the last "
            "successful upload.",
        )
        lag.add_metric([], replica.lag_seconds or 0.0)
        yield lag
        restarts = CounterMetricFamily(
            "evomsgd_replication_restarts", "Times Litestream died and was restarted."
        )
        restarts.add_metric([], replica.restarts)
        yield restarts


class CallbacksCollector(Collector):
    """The callback outbox's gauges, read from the ledger at scrape time (off the event loop)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            counts = ledger_callbacks.counts(self.store)
            oldest = ledger_callbacks.oldest_pending(self.store)
            endpoints = ledger_callbacks.endpoints(self.store, clock.now())
        except StoreUnavailable as exc:
            log.warning("metrics: %s", exc)
            return
        family = GaugeMetricFamily(
            "evomsgd_callbacks",
            "Callbacks in the outbox by state: sent, failed (given up, or 410 from a message's "
            "own URL), pending (to be sent or retried).",
            labels=["state"],
        )
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
        age = GaugeMetricFamily(
            "evomsgd_callbacks_oldest_pending_seconds",
            "Age of the event of the oldest pending callback (0 when none waits).",
        )
        age.add_metric([], 0.0 if oldest is None else max(0.0, clock.now() - oldest))
        yield age
        disabled = GaugeMetricFamily(
            "evomsgd_callback_endpoint_disabled",
            "1 for a callback endpoint disabled by a 410 Gone (until an operator enables it).",
            labels=["endpoint"],
        )
        for endpoint in endpoints:
            disabled.add_metric([endpoint.name], 1 if endpoint.disabled_at else 0)
        yield disabled
