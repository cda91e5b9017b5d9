"""The daemon's periodic purge: retention as the settings ask for it, at start and then every
`purge_interval` seconds, in a worker thread; one log line for what it removed."""

from __future__ import annotations

import asyncio
import logging
import threading

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger import retention
from evomsgd.ledger.records import PurgeReport, Retention
from evomsgd.ledger.store import Store

# Not evomsgd.purger: the logger's name is in every line the journal shows, kept as it was.
log = logging.getLogger("evomsgd.retention")


def policy(settings: Settings) -> Retention:
    """The retention the settings ask for."""
    return Retention(
        success_days=settings.keep_success_days,
        failed_days=settings.keep_failed_days,
        erase_text_days=settings.erase_text_days,
    )


async def run_periodically(store: Store, settings: Settings, stop: threading.Event) -> None:
    """Purge at start, then every `purge_interval` seconds, until cancelled (after `stop` is set,
    a purge in progress ends at its next batch and is waited for)."""
    while True:
        job = asyncio.ensure_future(
            asyncio.to_thread(
                retention.purge, store, clock.now(), policy(settings), stop=stop.is_set
            )
        )
        try:
            report = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread keeps the write connection between batches: let it end before the
            # ledger closes.
            await asyncio.wait([job])
            raise
        except StoreUnavailable as exc:
            log.warning(
                "retention: purge failed (%s); trying again in %gs", exc, settings.purge_interval
            )
        except Exception:  # a bug here must not end retention for the daemon's lifetime
            log.exception("retention: purge crashed; trying again in %gs", settings.purge_interval)
        else:
            if report.removed:
                log.info("retention: %s", summary(report))
            else:
                log.debug("retention: nothing to purge (%.3fs)", report.seconds)
        await asyncio.sleep(settings.purge_interval)


def megabytes(size: int) -> str:
    """A file size as the purge reports print it: "12.3 MB"."""
    return f"{size / 1_048_576:.1f} MB"


def summary(report: PurgeReport) -> str:
    """One log line."""
    return (
        f"removed {report.success} SUCCESS and {report.failed} failed messages with "
        f"{report.events} events, erased {report.texts_erased} texts, removed "
        f"{report.idempotency} expired idempotency keys and {report.media_files} unused media "
        f"files ({megabytes(report.media_bytes)}) in {report.seconds:g}s; ledger "
        f"{megabytes(report.bytes_before)} -> {megabytes(report.bytes_after)}"
    )
