"""Evolution's webhooks in: POST /webhooks/evolution[/{event}] (and /key/{secret}[/{event}] for
v1 servers, which cannot send custom headers). Authenticated by the webhook secret; the body is
read only after it, capped, never logged (its `apikey` field can hold an instance token), and
answered 200 once what it says is on disk."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from evomsgd.engine.receipts import SECRET_HEADER
from evomsgd.errors import ApiError
from evomsgd.models import EvolutionWebhook, WebhookAnswer
from evomsgd.web import routes
from evomsgd.web.api import SERVICE, _json, _read_body
from evomsgd.web.guards import WEBHOOK_PREFIX
from evomsgd.web.routes import Answer, Operation, Route

log = logging.getLogger("evomsgd.webhooks")

BAD_SECRET = (
    "this webhook needs evomsgd's webhook secret (header x-evomsgd-secret, or the path "
    "/webhooks/evolution/key/SECRET) - run `evomsgd webhook setup` to configure Evolution"
)


async def receive(request: web.Request) -> web.Response:
    """Store and apply one Evolution webhook; 401 without the secret, 200 once stored."""
    service = request.app[SERVICE]
    presented = request.match_info.get("secret") or request.headers.get(SECRET_HEADER)
    if not await service.webhook_authentic(presented):
        # Neither the presented value nor the body is logged: either may be a secret.
        log.warning("refused a webhook from %s: missing or wrong secret", request.remote)
        raise ApiError(401, "unauthorized", BAD_SECRET)
    raw = await _read_body(request)
    payload = _decode(raw)
    outcome = await service.receive_webhook(payload, raw, request.match_info.get("event"))
    return _json(WebhookAnswer(outcome=outcome))


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Without the parser's words: they quote the body.
        raise ApiError(400, "invalid_json", "the webhook body is not valid JSON") from None


def _operation(op_id: str, summary: str) -> Operation:
    return Operation(
        op_id,
        summary,
        (
            Answer(
                200, "Stored and applied (or ignored: an event evomsgd does not use)", WebhookAnswer
            ),
            routes.MALFORMED_JSON,
            Answer(401, "Missing or wrong webhook secret; nothing was read or changed"),
            routes.BODY_TIMEOUT,
            routes.BODY_TOO_LARGE,
            Answer(503, "The ledger cannot be written: Evolution retries later"),
        ),
        body=EvolutionWebhook,
    )


ROUTES = (
    Route(
        "POST",
        WEBHOOK_PREFIX,
        receive,
        _operation("evolutionWebhook", "Evolution's webhook (receipts, connection changes)"),
    ),
    Route(
        "POST",
        WEBHOOK_PREFIX + "/{event}",
        receive,
        _operation("evolutionWebhookByEvent", "Evolution's webhook with byEvents on"),
    ),
    Route(
        "POST",
        WEBHOOK_PREFIX + "/key/{secret}",
        receive,
        _operation("evolutionWebhookV1", "Evolution's webhook, the secret in the path (v1)"),
    ),
    Route(
        "POST",
        WEBHOOK_PREFIX + "/key/{secret}/{event}",
        receive,
        _operation("evolutionWebhookV1ByEvent", "The same with byEvents on (v1)"),
    ),
)


def add_routes(app: web.Application) -> None:
    """Register the webhook routes."""
    routes.register(app, ROUTES)
