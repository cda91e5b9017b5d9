"""GET /dashboard: one self-refreshing page over the JSON API, and GET /stats/hourly for its chart.

The page is static files shipped in the package (no CDN); its script talks to the same JSON API
as any client, so it obeys the same access rules.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from evomsgd import clock
from evomsgd.errors import ApiError
from evomsgd.ledger import receipts
from evomsgd.web import api, routes
from evomsgd.web.routes import Route

STATIC = Path(__file__).with_name("static")
MAX_HOURS = 7 * 24
# Attempt outcomes that mean WhatsApp has the message; every other outcome is a failed attempt.
DELIVERED = ("sent", "sent_unconfirmed")
# The funnel's steps, in the order of receipts.delivery_funnel's counts. `failed` is WhatsApp's
# ERROR receipt for a message Evolution accepted, not a message in FAILURE (never sent, so never
# in the funnel; failed attempts are the bucket's own `failed`).
FUNNEL = ("sent", "delivered", "read", "failed")

# Everything the page loads comes from the daemon itself: no inline script or style, no framing.
# blob: images are media thumbnails the page fetched from the daemon with its token (an <img>
# cannot send the Authorization header).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def page(request: web.Request) -> web.FileResponse:
    """The dashboard's HTML."""
    return web.FileResponse(STATIC / "dashboard.html", headers=_HEADERS)


async def hourly(request: web.Request) -> web.Response:
    """Per hour over the last `hours` (default 24), oldest first: attempts Evolution accepted and
    failed (`sent`, `failed`), and the delivery funnel of the messages it accepted in that hour
    (`funnel`: sent, then how many of those are delivered, read, or failed by WhatsApp now)."""
    raw = request.query.get("hours", "24")
    if not (raw.isdigit() and 1 <= int(raw) <= MAX_HOURS):
        raise ApiError(
            422,
            "validation_error",
            f"hours must be a whole number from 1 to {MAX_HOURS}, not {raw!r}",
            details=[{"field": "hours", "message": f"must be 1-{MAX_HOURS}"}],
        )
    hours = int(raw)
    end = int(clock.now()) + 1  # the last bucket ends just after now: it is the last hour
    start = end - hours * 3600
    store = request.app[api.SERVICE].store
    rows = await asyncio.to_thread(store.attempt_counts, start, 3600)
    sent, failed = [0] * hours, [0] * hours
    for index, outcome, count in rows:
        series = sent if outcome in DELIVERED else failed
        # Clamped: an attempt recorded a moment after `end` belongs to the last hour.
        series[min(max(index, 0), hours - 1)] += count
    funnel = [dict.fromkeys(FUNNEL, 0) for _ in range(hours)]
    for index, *counts in await asyncio.to_thread(receipts.delivery_funnel, store, start, 3600):
        step = funnel[min(max(index, 0), hours - 1)]
        for name, count in zip(FUNNEL, counts, strict=True):
            step[name] += count
    buckets = [
        {
            "start": clock.to_rfc3339(start + i * 3600),
            "sent": sent[i],
            "failed": failed[i],
            "funnel": funnel[i],
        }
        for i in range(hours)
    ]
    return web.json_response(
        {
            "bucket_seconds": 3600,
            "start": clock.to_rfc3339(start),
            "end": clock.to_rfc3339(end),
            "buckets": buckets,
        }
    )


# The page and the chart's figures serve the dashboard, outside the API document.
ROUTES = (
    Route("GET", "/dashboard", page, None),
    Route("GET", "/stats/hourly", hourly, None),
)


def add_routes(app: web.Application) -> None:
    """Register /dashboard, its files under /dashboard/static/ and GET /stats/hourly."""
    routes.register(app, ROUTES)
    app.router.add_static("/dashboard/static", STATIC)
