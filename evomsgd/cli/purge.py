"""`evomsgd purge`'s report: what retention removed (or would remove), then the file size."""

from __future__ import annotations

from evomsgd.engine.purger import megabytes
from evomsgd.ledger.records import PurgeReport, Retention


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
    lines.append(
        f"{verb} {report.media_files} media files no message uses "
        f"({megabytes(report.media_bytes)} {'to free' if report.dry_run else 'freed'})"
    )
    if report.dry_run:
        lines.append(f"dry run: nothing was changed (ledger {megabytes(report.bytes_before)})")
    else:
        how = {
            "incremental": " (incremental vacuum)",
            "full": " (VACUUM)",
            "none": "",
        }[report.vacuum]
        lines.append(
            f"ledger {megabytes(report.bytes_before)} -> {megabytes(report.bytes_after)}{how} "
            f"in {report.seconds:.2f}s"
        )
    return "\n".join(lines)
