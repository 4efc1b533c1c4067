"""POST /api/payments/webhook: YooKassa's notifications, applied exactly once.

A notification carries no signature, so it is only a hint that something
changed:

1. The caller must be in YooKassa's published networks (or
   YOOKASSA_TRUSTED_NETWORKS), by the source IP API Gateway saw, never a
   header: 403 otherwise, before the body is read.
2. The body must be a notification (`type`, `event`, `object`): 400 otherwise.
3. Events this backend does not use (deal.closed, payout.succeeded, ...)
   answer 200 and change nothing.
4. The payment (or refund) is re-read from YooKassa's API and only that
   status is applied (functions/payment_sync.py): a credit costs one database
   statement, guarded so that any number of concurrent deliveries credit once.

Duplicates, statuses that are not a step forward and payments we do not know
answer 200: YooKassa stops delivering what can never apply. When YooKassa's
API or the database cannot be reached the answer is 503 with Retry-After, so
YooKassa delivers it again (and the reconciler catches what it never does).

Each notification is counted as the metric WebhookNotifications with the
dimension Outcome: credited, applied (another step forward, or a refund),
unchanged, ignored, unknown_payment, untrusted, malformed, unavailable.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import Forbidden, InvalidRequest, ProviderUnavailable, Unavailable
from database.model import Model
from functions import metrics, payment_sync
from functions.app import build_app
from functions.errors import MalformedRequest
from functions.http import json_response
from functions.identity import source_ip
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from functions.yookassa import (
    Notification,
    default_client,
    is_trusted_source,
    lambda_budget,
    parse_notification,
    time_budget,
)
from repositories.payments import ApplyResult

log = logging.getLogger("dreamlens.webhook")

Outcome = Literal["credited", "applied", "unchanged", "ignored", "unknown_payment"]


class YooKassaNotification(Model):
    """What YooKassa posts (documented here; the handler parses the raw body)."""

    type: Literal["notification"]
    event: str = Field(examples=["payment.succeeded", "refund.succeeded"])
    object: dict[str, Any] = Field(
        examples=[{"id": "2d7a5e3c-000f-5000-9000-1b68e7b15f3f", "status": "succeeded"}],
        description="The payment or refund; its status is re-read from YooKassa's API, never taken from here",
    )


class WebhookAck(Model):
    outcome: Outcome


def _count(outcome: str) -> None:
    metrics.emit({"WebhookNotifications": 1}, dimensions={"Outcome": outcome})


def _outcome(result: ApplyResult) -> Outcome:
    if result.payment is None:
        return "unknown_payment"
    if not result.changed:
        return "unchanged"
    return "credited" if result.credited_tokens > 0 else "applied"


def _provider_has_no_such_object(exc: InvalidRequest) -> bool:
    details = exc.details
    return isinstance(details, dict) and details.get("provider_status") == 404


async def _apply(notification: Notification) -> ApplyResult:
    client = default_client()
    if notification.event.startswith("refund."):
        return await payment_sync.sync_refund(client, notification.object_id)
    assert notification.payment_id is not None  # parse_notification sets it for payment events
    return await payment_sync.sync_payment(client, notification.payment_id)


@endpoint(auth="webhook", request=YooKassaNotification, response=WebhookAck, errors=[503])
async def payment_webhook(request: Request) -> Response:
    """YooKassa's payment and refund notifications.

    Accepted only from YooKassa's networks; the status applied is the one
    re-read from YooKassa's API. 200 for applied, duplicate, ignored and
    unknown; 503 (YooKassa delivers again) when YooKassa or the database
    could not be reached.
    """
    ip = source_ip(request)
    if ip is None or not is_trusted_source(ip):
        _count("untrusted")
        log.warning("webhook call from %s, outside YooKassa's networks: refused", ip)
        raise Forbidden("Notifications are accepted from YooKassa's networks only")
    # read outside the try: a body over the limit is 413 (PayloadTooLarge is
    # an InvalidRequest too), not a malformed notification
    body = await request.body()
    try:
        notification = parse_notification(body)
    except InvalidRequest as exc:
        _count("malformed")
        raise MalformedRequest(exc.message) from exc
    if notification.ignored:
        _count("ignored")
        return json_response(WebhookAck(outcome="ignored"))

    try:
        with time_budget(lambda_budget(request.scope.get("aws.context"))):
            result = await _apply(notification)
    except Unavailable:
        _count("unavailable")
        raise
    except InvalidRequest as exc:
        if _provider_has_no_such_object(exc):
            # from a trusted network but not our shop's: nothing to apply, ever
            _count("unknown_payment")
            return json_response(WebhookAck(outcome="unknown_payment"))
        # our credentials or a bug, not the notification: keep it coming
        log.error(
            "webhook %s %s could not be applied: %s", notification.event, notification.object_id, exc.message
        )
        _count("unavailable")
        raise ProviderUnavailable("The notification could not be verified; deliver it again") from exc
    outcome = _outcome(result)
    _count(outcome)
    return json_response(WebhookAck(outcome=outcome))


routes = [Route("/api/payments/webhook", payment_webhook, methods=["POST"])]
app = build_app(routes)
handler = LambdaEntry(app)
