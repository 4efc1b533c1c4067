"""Scheduled jobs: each an async function the CLI runs (`dreamlens <job>`)
and a Lambda handler serverless.yml schedules.

Every job is safe to run twice at once (two schedules overlapping, or an
operator's manual run beside the schedule): the statements they run are
guarded by the state they change and keyed where they move tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from database import DreamLensError
from functions import metrics, runtime, settings
from repositories import audit, generations, payments, subscriptions, usage

if TYPE_CHECKING:
    from functions.yookassa import YooKassaClient

log = logging.getLogger("dreamlens.jobs")

Job = Callable[[], Coroutine[Any, Any, dict[str, Any]]]

# open payments asked about per statement; a run asks about each one once,
# and about RECONCILE_MAX_CHECKS at most (one YooKassa call each): a larger
# backlog is covered by the next runs, least recently asked first
RECONCILE_PAGE_SIZE = 100
RECONCILE_MAX_CHECKS = 1000


def _minutes(name: str, default: int) -> timedelta:
    return timedelta(minutes=settings.integer(name, default, minimum=1))


async def reap_generations() -> dict[str, Any]:
    """Leases that ran out go back to pending; past 3 attempts, or pending
    past the cut-off (GENERATION_PENDING_CUTOFF_MINUTES, default 15), a
    generation fails and its cost is refunded once. In bounded batches
    (GENERATION_REAP_BATCH_SIZE rows of each kind a statement, at most
    GENERATION_REAP_MAX_BATCHES statements a run), so a backlog of any size
    drains over runs that each finish inside the Lambda's timeout."""
    pending_cutoff = _minutes("GENERATION_PENDING_CUTOFF_MINUTES", 15)
    batch_size = settings.integer("GENERATION_REAP_BATCH_SIZE", 1000, minimum=1)
    max_batches = settings.integer("GENERATION_REAP_MAX_BATCHES", 50, minimum=1)
    returned = failed = batches = 0
    more = True
    while more and batches < max_batches:
        result = await generations.reap_generations(pending_cutoff=pending_cutoff, batch_size=batch_size)
        returned += result.returned
        failed += result.failed
        batches += 1
        more = result.more
    metrics.emit({"GenerationsRequeued": returned, "GenerationsExpired": failed})
    return {"returned": returned, "failed": failed, "batches": batches}


async def expire_subscriptions() -> dict[str, Any]:
    expired = await subscriptions.expire_ended()
    metrics.emit({"SubscriptionsExpired": expired})
    return {"expired": expired}


async def prune_usage(now: datetime | None = None) -> dict[str, Any]:
    """Delete usage_logs older than USAGE_RETENTION_DAYS (default 30), one
    bounded batch per statement, stopping after a bounded number of batches
    so a run never outlives its Lambda timeout (the next run goes on)."""
    # at least a day: the signup limit counts the last hour's signup rows
    retention = timedelta(days=settings.integer("USAGE_RETENTION_DAYS", 30, minimum=1))
    batch_size = settings.integer("USAGE_PRUNE_BATCH_SIZE", 5000, minimum=1)
    max_batches = settings.integer("USAGE_PRUNE_MAX_BATCHES", 50, minimum=1)
    cut_off = (now or datetime.now(UTC)) - retention
    deleted = batches = 0
    while batches < max_batches:
        removed = await usage.prune_usage(cut_off, batch_size=batch_size)
        deleted += removed
        batches += 1
        if removed < batch_size:
            break
    metrics.emit({"UsageLogsPruned": deleted})
    return {"deleted": deleted, "batches": batches}


async def audit_ledger() -> dict[str, Any]:
    """The ledger audit: every violation logged, and counted as a metric an
    alarm can watch."""
    violations = await audit.find_violations()
    for violation in violations:
        log.error("ledger violation: user %s %s: %s", violation.user_id, violation.problem, violation.detail)
    metrics.emit({"LedgerViolations": len(violations)})
    return {"violations": len(violations)}


async def reconcile_payments(now: datetime | None = None, stop_at: float | None = None) -> dict[str, Any]:
    """Ask YooKassa about payments still open after PAYMENT_RECONCILE_AFTER_MINUTES
    (default 10): a lost webhook must not lose anyone's money.

    Payments that never got a YooKassa payment are canceled (`abandoned`)
    after PAYMENT_ABANDON_AFTER_MINUTES (default 1,440: a day, YooKassa's
    Idempotence-Key window, within which a client's repeat still meets the
    payment YooKassa may have made). Nobody was shown a page to pay them.

    Refunds are reconciled too: YooKassa lists the succeeded refunds of the
    last PAYMENT_REFUND_LOOKBACK_MINUTES (default 4,320: three days, so a
    few failed runs lose nothing), and any not applied here (its
    notification lost) is applied, taking its tokens back.

    A run asks about every open payment once (up to RECONCILE_MAX_CHECKS),
    page by page, those asked about least recently first: payments that stay
    open for hours (unpaid, or refused on an amount mismatch) cannot keep
    newer ones waiting, nor the refunds, which are reconciled first.
    `stop_at` (time.monotonic()) ends the run early, before the Lambda's own
    timeout would cut a payment off mid-way; the next run takes the rest."""
    from functions.yookassa import default_client

    now = now or datetime.now(UTC)
    abandon_before = now - _minutes("PAYMENT_ABANDON_AFTER_MINUTES", 1440)
    abandoned = await payments.cancel_abandoned_payments(abandon_before)
    older_than = now - _minutes("PAYMENT_RECONCILE_AFTER_MINUTES", 10)
    client = default_client()
    # refunds first: their work is bounded (MAX_REFUND_PAGES), while a backlog
    # of open payments may take all the time a run has
    refunds = failed = 0
    if not _out_of_time(stop_at):
        try:
            refunds, failed = await _reconcile_refunds(client, now, stop_at)
        except DreamLensError as exc:
            failed += 1
            log.warning("listing refunds failed: %s", exc.code)
    checked, changed, payments_failed = await _reconcile_open_payments(client, older_than, stop_at)
    failed += payments_failed
    metrics.emit(
        {
            "PaymentsReconciled": changed,
            "PaymentReconcileFailures": failed,
            "PaymentsAbandoned": abandoned,
            "RefundsReconciled": refunds,
        }
    )
    return {
        "checked": checked,
        "changed": changed,
        "failed": failed,
        "abandoned": abandoned,
        "refunds": refunds,
    }


def _out_of_time(stop_at: float | None) -> bool:
    return stop_at is not None and time.monotonic() >= stop_at


async def _reconcile_open_payments(
    client: YooKassaClient, older_than: datetime, stop_at: float | None
) -> tuple[int, int, int]:
    """Ask about every payment open since before `older_than`, once, page by
    page, the least recently asked first, up to RECONCILE_MAX_CHECKS:
    (checked, changed, failed)."""
    from functions import payment_sync

    asked: list[UUID] = []
    changed = failed = 0
    while not _out_of_time(stop_at) and len(asked) < RECONCILE_MAX_CHECKS:
        page_size = min(RECONCILE_PAGE_SIZE, RECONCILE_MAX_CHECKS - len(asked))
        page = await payments.open_payments(older_than, page_size, skip=asked)
        if not page:
            break
        asked_now: list[UUID] = []
        for payment in page:
            if _out_of_time(stop_at):
                break
            asked_now.append(payment.id)
            try:
                result = await payment_sync.sync_payment(client, payment.provider_payment_id or "")
            except DreamLensError as exc:
                # one provider hiccup must not stop the others; a later run retries
                failed += 1
                log.warning("reconcile of payment %s failed: %s", payment.id, exc.code)
                continue
            changed += int(result.changed)
        # failed ones too: each goes behind the others until its turn comes again
        await payments.mark_reconciled(asked_now)
        asked += asked_now
    return len(asked), changed, failed


async def _reconcile_refunds(client: YooKassaClient, now: datetime, stop_at: float | None) -> tuple[int, int]:
    """Apply the recent succeeded refunds whose notifications never arrived:
    (how many were applied, how many failed and wait for the next run)."""
    from functions import payment_sync

    since = now - _minutes("PAYMENT_REFUND_LOOKBACK_MINUTES", 4320)
    listed = await client.succeeded_refunds_since(since, stop_at)
    applied, ours = await payments.applied_refunds_and_our_payments(
        [refund.id for refund in listed], [refund.payment_id for refund in listed]
    )
    reconciled = failed = 0
    for refund in listed:
        if refund.id in applied or refund.payment_id not in ours:
            continue
        if stop_at is not None and time.monotonic() >= stop_at:
            break
        try:
            result = await payment_sync.apply_refund(client, refund)
        except DreamLensError as exc:
            # one refund that keeps failing must not hide the older ones
            failed += 1
            log.warning("reconcile of refund %s failed: %s", refund.id, exc.code)
            continue
        reconciled += int(result.changed)
    return reconciled, failed


JOBS: dict[str, Job] = {
    "reap-generations": reap_generations,
    "expire-subscriptions": expire_subscriptions,
    "prune-usage": prune_usage,
    "audit-ledger": audit_ledger,
    "reconcile-payments": reconcile_payments,
}


def _handler(job: Job) -> Callable[[Any, Any], dict[str, Any]]:
    def handle(event: Any, context: Any) -> dict[str, Any]:
        settings.load_database_secrets()
        if job is reconcile_payments and context is not None:
            # one provider call may take its full retry budget: start none that could
            # run past the function's timeout
            remaining = context.get_remaining_time_in_millis() / 1000
            result = runtime.run(reconcile_payments(stop_at=time.monotonic() + remaining - 35))
        else:
            result = runtime.run(job())
        log.info("%s: %s", job.__name__, result)
        return result

    handle.__name__ = f"{job.__name__}_handler"
    return handle


reap_generations_handler = _handler(reap_generations)
expire_subscriptions_handler = _handler(expire_subscriptions)
prune_usage_handler = _handler(prune_usage)
audit_ledger_handler = _handler(audit_ledger)
reconcile_payments_handler = _handler(reconcile_payments)
