"""Bring our payment in line with YooKassa's word on it.

Shared by the webhook and the reconciler: a notification is only a hint that
something changed. The status, amount and currency we act on are the ones
YooKassa's API returns when asked, never the notification's body, which
carries no signature.
"""

from __future__ import annotations

import logging

from functions import metrics
from functions.yookassa import ProviderRefund, YooKassaClient
from repositories import payments
from repositories.payments import ApplyResult

log = logging.getLogger(__name__)

UNCHANGED = ApplyResult(payment=None, changed=False, credited_tokens=0)


async def sync_payment(client: YooKassaClient, provider_payment_id: str) -> ApplyResult:
    """Re-read the payment at YooKassa and apply its status (one database
    round trip). A payment we do not know changes nothing."""
    provider = await client.get_payment(provider_payment_id)
    result = await payments.apply_provider_status(
        provider.id, provider.status, amount=provider.amount, currency=provider.currency
    )
    if (
        result.payment is not None
        and not result.changed
        and provider.status == "succeeded"
        and (result.payment.amount != provider.amount or result.payment.currency != provider.currency)
    ):
        # never credited; an operator must look at it
        log.error("payment %s: provider amount differs from ours; not credited", result.payment.id)
        metrics.emit({"PaymentAmountMismatch": 1})
    if result.changed and result.credited_tokens > 0:
        # counted here, not by the caller: webhook and reconciler credits alike
        metrics.emit({"TokensCredited": result.credited_tokens})
    return result


async def sync_refund(client: YooKassaClient, provider_refund_id: str) -> ApplyResult:
    """Re-read the refund at YooKassa; apply it only once it has succeeded.

    When the payment's own success was never applied here (its notification
    was lost), that is applied first, so the refund has tokens to take back.
    """
    return await apply_refund(client, await client.get_refund(provider_refund_id))


async def apply_refund(client: YooKassaClient, refund: ProviderRefund) -> ApplyResult:
    """Apply a refund as YooKassa's API gave it (re-read, or listed by the
    reconciler); only a succeeded one changes anything."""
    if refund.status != "succeeded":
        return UNCHANGED
    local = await payments.get_payment_by_provider_id(refund.payment_id)
    if local is None:
        return UNCHANGED
    if local.status in ("pending", "waiting_for_capture"):
        await sync_payment(client, refund.payment_id)
    result = await payments.apply_refund(refund.payment_id, refund.id, refund.amount)
    if result.changed and result.credited_tokens < 0:
        metrics.emit({"TokensReversed": -result.credited_tokens})
    return result
