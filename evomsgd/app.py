"""create_app: the only composition root. Resources start in dependency order, stop in reverse."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.engine import purger, replication
from evomsgd.engine.callbacks import CallbackSender
from evomsgd.engine.delivery import Delivery
from evomsgd.engine.dispatcher import Dispatcher
from evomsgd.engine.receipts import Receipts
from evomsgd.engine.replication import Replicator
from evomsgd.engine.senders import build_sender
from evomsgd.engine.workers import TaskQueue
from evomsgd.evolution.client import Sender, new_session
from evomsgd.evolution.outcomes import StateProbe
from evomsgd.ledger import callbacks as ledger_callbacks
from evomsgd.ledger.commit import GroupCommitter
from evomsgd.ledger.records import InsertResult, Message, NewMessage
from evomsgd.ledger.store import Store
from evomsgd.ledger.tokens import TokenCache
from evomsgd.service import Service, created_per_instance
from evomsgd.web import api, dashboard, errors, forms, guards, metrics, openapi, views, webhooks
from evomsgd.web import callbacks as web_callbacks

log = logging.getLogger("evomsgd.app")

STORE = web.AppKey("store", Store)
SENDER = web.AppKey("sender", Sender)
QUEUE = web.AppKey("queue", TaskQueue)
REPLICATOR = web.AppKey("replicator", Replicator)
CALLBACKS = web.AppKey("callbacks", CallbackSender)
HEALTH_CHECK_EVERY = 10.0

# The body limit doubles as a guard: a request larger than this is refused with 413 unread.
MAX_BODY = forms.MAX_TEXT_BODY  # a media request raises its own (web/forms.py)


def create_app(
    settings: Settings,
    data_dir: Path,
    *,
    sender_factory: Callable[[aiohttp.ClientSession], Sender] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> web.Application:
    """The aiohttp application with the ledger, the Evolution client, the dispatcher and Huey."""
    # errors_middleware is outermost so every refusal of the guards has the one error shape.
    app = web.Application(
        middlewares=[
            errors.errors_middleware,
            guards.browser_middleware(settings),
            guards.auth_middleware(settings),
        ],
        client_max_size=MAX_BODY,
    )
    app.on_response_prepare.append(guards.cors_headers(settings))

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = await asyncio.to_thread(
            Store,
            data_dir,
            durability=settings.durability,
            replicated=settings.replica_url is not None,
        )
        app[STORE] = store
        app[guards.TOKENS] = TokenCache(store)
        yield
        await asyncio.to_thread(store.close)

    async def replica_ctx(app: web.Application) -> AsyncIterator[None]:
        # After the ledger opened (and migrated), before anything writes; stopped after the
        # engine drained, so Litestream's final upload carries the last outcomes.
        if settings.replica_url is None:
            yield
            return
        replicator = Replicator(settings, data_dir, replication.require(settings))
        await replicator.start()
        app[REPLICATOR] = replicator
        yield
        await replicator.stop()

    async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
        if not settings.purge_interval:
            yield
            return
        stop = threading.Event()
        task = asyncio.create_task(purger.run_periodically(app[STORE], settings, stop))
        yield
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def sender_ctx(app: web.Application) -> AsyncIterator[None]:
        async with new_session() as session:
            app[SENDER] = (
                sender_factory(session)
                if sender_factory is not None
                else build_sender(settings, session)
            )
            yield

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        store, sender = app[STORE], app[SENDER]
        recovered = await asyncio.to_thread(store.recover, clock.now(), only_expired_leases=False)
        if recovered:
            log.warning(
                "recovered %s message(s) that were being sent when the daemon stopped; "
                "they will be sent again and are marked as possibly duplicated",
                len(recovered),
            )

        def probe(instance: str) -> concurrent.futures.Future[StateProbe]:
            return asyncio.run_coroutine_threadsafe(sender.connection_state(instance), loop)

        def committed(news: Sequence[NewMessage], results: Sequence[InsertResult]) -> None:
            created = created_per_instance(news, results)
            dispatcher.accepted(created)
            meter.count_accepted(created)

        committer = GroupCommitter(
            store, loop, idempotency_ttl=settings.idempotency_ttl, on_commit=committed
        )

        def claim(ids: list[str], now: float, lease: float) -> list[Message | None]:
            # One transaction for the step's claims, shared with whatever else is being written.
            return committer.write(
                lambda cur: [store.claim_in(cur, message_id, now, lease) for message_id in ids]
            ).result()

        def hold(holds: list[tuple[str, str, float, str]], now: float) -> int:
            # Quiet hours: held messages share a transaction with the step's other writes.
            return committer.write(lambda cur: store.hold_in(cur, holds, now)).result()

        def loop_busy() -> bool:
            return committer.accepting() or committer.loop_late()

        def announce(instance: str, paused: bool, reason: str, now: float) -> None:
            # instance.paused / instance.resumed callbacks for the health pauses the dispatcher
            # decides in memory (a lost one is decided again by the next start's probe).
            committer.write(
                lambda cur: ledger_callbacks.instance_event_in(cur, instance, paused, reason, now)
            )

        queue = TaskQueue(data_dir, settings.workers)
        dispatcher = Dispatcher(
            store,
            settings,
            queue.submit,
            probe,
            claim=claim,
            hold=hold,
            busy=loop_busy,
            announce=announce,
        )
        meter = await asyncio.to_thread(metrics.Metrics, store, dispatcher.lanes_view, settings)
        replicator = app.get(REPLICATOR)
        if replicator is not None:
            meter.registry.register(metrics.ReplicationCollector(replicator.view))
        app[metrics.METRICS] = meter
        delivery = Delivery(
            store,
            committer,
            sender,
            loop,
            settings,
            report=dispatcher.finished,
            on_outcome=meter.on_outcome,
        )
        queue.register(delivery.run)
        receipts = Receipts(
            store, committer, dispatcher, settings, sender=sender, on_receipt=meter.on_receipt
        )
        service = Service(
            settings,
            store,
            committer,
            dispatcher,
            data_dir,
            alive_workers=queue.alive_workers,
            receipts=receipts,
            replication=None if replicator is None else replicator.view,
        )
        app[api.SERVICE] = service
        app[QUEUE] = queue
        committer.start()
        queue.start()
        await asyncio.to_thread(dispatcher.start)
        health_task = asyncio.create_task(_check_workers(queue))
        sweep_task = asyncio.create_task(receipts.run())
        if on_ready is not None:
            on_ready()
        yield
        for task in (health_task, sweep_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await drain(dispatcher, delivery, queue, committer, settings.drain_timeout)

    async def callbacks_ctx(app: web.Application) -> AsyncIterator[None]:
        store, service = app[STORE], app[api.SERVICE]

        def render(message_id: str) -> dict[str, Any] | None:
            record = service.task_record(message_id)
            if record is None:
                return None
            data: dict[str, Any] = views.task_view(record).model_dump(mode="json")
            if settings.callback_include_text:
                data["message"] = record.message.text
            return data

        secret = settings.callback_secret
        await asyncio.to_thread(
            ledger_callbacks.sync_default,
            store,
            settings.callback_url,
            None if secret is None else secret.get_secret_value(),
            settings.callback_retrying,
            settings.callback_rotation_overlap,
            clock.now(),
        )
        # Its own session: a slow receiver never holds a connection of Evolution's pool.
        async with aiohttp.ClientSession() as session:
            sender = CallbackSender(store, service.committer, settings, render, session)
            app[CALLBACKS] = sender
            app[metrics.METRICS].registry.register(metrics.CallbacksCollector(store))
            task = asyncio.create_task(sender.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sender.stop()

    app.cleanup_ctx.extend(
        [store_ctx, replica_ctx, retention_ctx, sender_ctx, engine_ctx, callbacks_ctx]
    )
    api.add_routes(app)
    webhooks.add_routes(app)
    openapi.add_routes(app)
    metrics.add_routes(app)
    dashboard.add_routes(app)
    web_callbacks.add_routes(app)
    return app


async def drain(
    dispatcher: Dispatcher,
    delivery: Delivery,
    queue: TaskQueue,
    committer: GroupCommitter,
    timeout: float,
) -> None:
    """Stop dispatching, let in-flight sends finish (bounded), stop the workers and the writer."""
    dispatcher.drain()
    in_flight = dispatcher.in_flight()
    if in_flight:
        log.info("draining: waiting up to %gs for %s in-flight send(s)", timeout, in_flight)
    finished = await asyncio.to_thread(dispatcher.wait_idle, timeout)
    if not finished:
        log.warning(
            "drain timeout: %s send(s) still in flight; they will be recovered at the next start",
            dispatcher.in_flight(),
        )
        delivery.abandon()
        await asyncio.sleep(0)  # let the cancelled sends unwind before the writer stops
    await asyncio.to_thread(queue.stop)
    await asyncio.to_thread(committer.stop)
    await asyncio.to_thread(dispatcher.stop)
    log.info("drained: workers stopped, queued messages wait on disk for the next start")


async def _check_workers(queue: TaskQueue) -> None:
    """Huey restarts dead workers only inside Consumer.run, which an embedded consumer skips."""
    while True:
        await asyncio.sleep(HEALTH_CHECK_EVERY)
        await asyncio.to_thread(queue.check_health)
