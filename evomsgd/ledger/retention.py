"""Retention: which finished messages go and when; the daemon's periodic purge; its report."""

from __future__ import annotations

import asyncio
import logging
import threading

from evomsgd import clock
from evomsgd.config import Settings
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger.records import PurgeReport, Retention
from evomsgd.ledger.store import Store

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
            asyncio.to_thread(store.purge, clock.now(), policy(settings), stop=stop.is_set)
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


def _mb(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB"


def summary(report: PurgeReport) -> str:
    """One log line."""
    return (
        f"removed {report.success} SUCCESS and {report.failed} failed messages with "
        f"{report.events} events, erased {report.texts_erased} texts, removed "
        f"{report.idempotency} expired idempotency keys in {report.seconds:g}s; ledger "
        f"{_mb(report.bytes_before)} -> {_mb(report.bytes_after)}"
    )


def render(report: PurgeReport, rules: Retention) -> str:
    """What `evomsgd purge` prints: one line per kind of row, then the file size."""
    verb = "would remove" if report.dry_run else "removed"
    lines = []
    for name, count, days, var in (
        ("SUCCESS", report.success, rules.success_days, "EVOMSGD_KEEP_SUCCESS_DAYS"),
        (
            "FAILURE/EXPIRED/CANCELED",
            report.failed,
            rules.failed_days,
            "EVOMSGD_KEEP_FAILED_DAYS",
        ),
    ):
        if days > 0:
            lines.append(f"{verb} {count} {name} messages finished over {days:g} days ago")
        else:
            lines.append(f"kept every {name} message ({var}=0)")
    lines.append(f"{verb} {report.events} history events of those messages")
    if rules.erase_text_days is None:
        lines.append("kept every message text (EVOMSGD_ERASE_TEXT_DAYS is not set)")
    else:
        erase = "would erase" if report.dry_run else "erased"
        lines.append(
            f"{erase} the text of {report.texts_erased} messages finished over "
            f"{rules.erase_text_days:g} days ago"
        )
    lines.append(f"{verb} {report.idempotency} expired idempotency keys")
    if report.dry_run:
        lines.append(f"dry run: nothing was changed (ledger {_mb(report.bytes_before)})")
    else:
        how = {
            "incremental": " (incremental vacuum)",
            "full": " (VACUUM)",
            "none": "",
        }[report.vacuum]
        lines.append(
            f"ledger {_mb(report.bytes_before)} -> {_mb(report.bytes_after)}{how} "
            f"in {report.seconds:.2f}s"
        )
    return "\n".join(lines)
