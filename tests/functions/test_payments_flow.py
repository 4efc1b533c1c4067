"""Payments over real HTTP on localhost, as clients and the scheduler meet
them: one Idempotency-Key sent many times at once, and payments whose
webhook never arrives credited by the reconciler (functions.jobs) once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import httpx
import pytest

from database import config, pool
from functions import jobs, yookassa
from functions.fake_yookassa import FakeYooKassa
from functions.yookassa import close_default_client
from repositories.audit import find_violations
from tests import db
from tests.functions.payment_support import (
    configure_provider,
    create,
    payment_row,
    payments_server,  # noqa: F401 (a fixture)
    release_together,
    running_fake,  # noqa: F401 (a fixture)
    user_headers,
)

CONCURRENT_REQUESTS = 10


@pytest.fixture
async def fake(
    running_fake: FakeYooKassa,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    admin: asyncpg.Connection,
) -> AsyncIterator[FakeYooKassa]:
    """The fake as YooKassa, its notifications lost (nothing is delivered);
    a pool wide enough for concurrent requests; the books balance after."""
    running_fake.reset()
    running_fake.webhook_url = None
    configure_provider(monkeypatch, running_fake)
    await pool.close_pool()
    config.configure(pool_max_size=CONCURRENT_REQUESTS)
    yield running_fake
    running_fake.recover()
    await close_default_client()
    assert await db.audit_problems(admin) == []
    assert await find_violations() == []
    await pool.close_pool()


def run(checked: int, changed: int, failed: int, abandoned: int = 0, refunds: int = 0) -> dict[str, int]:
    """What a reconciler run reports."""
    return {
        "checked": checked,
        "changed": changed,
        "failed": failed,
        "abandoned": abandoned,
        "refunds": refunds,
    }


async def provider_id(admin: asyncpg.Connection, payment_id: str) -> str:
    value: str = (await payment_row(admin, payment_id))["provider_payment_id"]
    return value


async def buyer(admin: asyncpg.Connection, device: str) -> UUID:
    user_id: UUID = await admin.fetchval("select id from users where device_id = $1", device)
    return user_id


# ------------------------------------------------------------------ creating


async def test_one_key_sent_many_times_at_once_is_one_payment_at_yookassa(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await create(http, "device-flow-race1", key="warm-up")  # the device's user exists now
    responses = await asyncio.gather(
        *(
            http.post(
                "/api/payments",
                json={"package_id": "tokens_200"},
                headers=user_headers("device-flow-race1", "k"),
            )
            for _ in range(CONCURRENT_REQUESTS)
        )
    )
    assert [r.status_code for r in responses] == [201] * CONCURRENT_REQUESTS
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies)
    assert await admin.fetchval("select count(*) from payments where idempotency_key = 'k'") == 1
    # racing requests may each ask YooKassa, always under one Idempotence-Key
    assert len(fake.payments) == 2  # the warm-up's and this one
    keys = {r.idempotence_key for r in fake.requests_to("POST", "/v3/payments")}
    assert len(keys) == 2 and bodies[0]["id"] in keys


# ---------------------------------------------------------------- reconciler


async def test_a_payment_whose_webhook_never_arrives_is_credited_by_the_reconciler_once(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-flow-lost1", "tokens_200")
    await fake.succeed(await provider_id(admin, created["id"]))  # notification lost
    user_id = await buyer(admin, "device-flow-lost1")
    assert await db.balance(admin, user_id) == 5

    # too young to be chased: YooKassa may still be delivering
    assert await jobs.reconcile_payments() == run(0, 0, 0)

    later = datetime.now(UTC) + timedelta(minutes=30)
    # both runs find the payment open: YooKassa answers neither until both ask
    fake.go_slow(60)
    first, second, _ = await asyncio.gather(
        jobs.reconcile_payments(now=later),
        jobs.reconcile_payments(now=later),
        release_together(fake, f"/v3/payments/{await provider_id(admin, created['id'])}", 2),
    )
    assert first["checked"] == second["checked"] == 1
    assert first["changed"] + second["changed"] == 1
    assert await db.balance(admin, user_id) == 5 + 200
    purchases = [row for row in await db.ledger(admin, user_id) if row["type"] == "purchase"]
    assert [row["idempotency_key"] for row in purchases] == [f"payment:{created['id']}"]
    # settled: nothing left to chase
    assert await jobs.reconcile_payments(now=later) == run(0, 0, 0)

    shown = await http.get(f"/api/payments/{created['id']}", headers=user_headers("device-flow-lost1"))
    assert shown.json()["status"] == "succeeded"


async def test_the_reconciler_leaves_unpaid_payments_open_and_closes_canceled_ones(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    unpaid = await create(http, "device-flow-open1")
    abandoned = await create(http, "device-flow-open1")
    await fake.cancel(await provider_id(admin, abandoned["id"]))
    later = datetime.now(UTC) + timedelta(minutes=30)
    assert await jobs.reconcile_payments(now=later) == run(2, 1, 0)
    assert (await payment_row(admin, unpaid["id"]))["status"] == "pending"
    assert (await payment_row(admin, abandoned["id"]))["status"] == "canceled"
    assert await db.balance(admin, await buyer(admin, "device-flow-open1")) == 5


async def test_the_reconciler_survives_yookassa_down_and_credits_on_the_next_run(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-flow-down1")
    await fake.succeed(await provider_id(admin, created["id"]))
    later = datetime.now(UTC) + timedelta(minutes=30)
    fake.go_down()
    # the payment's check failed, and so did the listing of refunds
    assert await jobs.reconcile_payments(now=later) == run(1, 0, 2)
    fake.recover()
    assert await jobs.reconcile_payments(now=later) == run(1, 1, 0)
    assert await db.balance(admin, await buyer(admin, "device-flow-down1")) == 55


async def test_the_reconciler_stops_before_its_deadline_and_the_next_run_goes_on(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    """A run that could outlive its Lambda timeout starts no provider call it
    cannot finish; nothing is lost, the next run picks the payment up."""
    created = await create(http, "device-flow-late1")
    await fake.succeed(await provider_id(admin, created["id"]))
    later = datetime.now(UTC) + timedelta(minutes=30)
    out_of_time = await jobs.reconcile_payments(now=later, stop_at=time.monotonic() - 1)
    assert out_of_time == run(0, 0, 0)
    assert await db.balance(admin, await buyer(admin, "device-flow-late1")) == 5
    next_run = await jobs.reconcile_payments(now=later, stop_at=time.monotonic() + 60)
    assert next_run == run(1, 1, 0)
    assert await db.balance(admin, await buyer(admin, "device-flow-late1")) == 5 + 50


async def test_a_backlog_of_unpaid_payments_does_not_hide_a_paid_one_from_the_reconciler(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: every run asked only about the 100 oldest open payments. With more
    unpaid ones than that (checkouts left open), a newer paid payment whose
    notification was lost waited until the backlog expired at YooKassa. A run
    now goes page by page (here 4 a page) up to its cap (here 6), and the
    next run starts with those never asked about."""
    monkeypatch.setattr(jobs, "RECONCILE_PAGE_SIZE", 4)
    monkeypatch.setattr(jobs, "RECONCILE_MAX_CHECKS", 6)
    for _ in range(9):
        await create(http, "device-flow-backlog")
    await admin.execute("update payments set created_at = created_at - interval '1 minute'")
    paid = await create(http, "device-flow-backlog", "tokens_200")
    await fake.succeed(await provider_id(admin, paid["id"]))  # notification lost
    later = datetime.now(UTC) + timedelta(minutes=30)

    def asked() -> list[str]:
        return [r.path for r in fake.requests if r.method == "GET" and r.path.startswith("/v3/payments/")]

    assert await jobs.reconcile_payments(now=later) == run(6, 0, 0)
    assert len(asked()) == len(set(asked())) == 6
    assert await db.balance(admin, await buyer(admin, "device-flow-backlog")) == 5
    # the three never asked about and the paid one first, then two of the first run's
    assert await jobs.reconcile_payments(now=later) == run(6, 1, 0)
    assert await db.balance(admin, await buyer(admin, "device-flow-backlog")) == 5 + 200
    assert len(set(asked())) == 10
    assert await admin.fetchval("select count(*) from payments where reconciled_at is null") == 0


# ------------------------------------------------------- refunds reconciled


async def reversals(admin: asyncpg.Connection, user_id: UUID) -> list[int]:
    return [row["amount"] for row in await db.ledger(admin, user_id) if row["type"] == "reversal"]


async def test_a_refund_whose_notification_never_arrives_is_taken_back_by_the_reconciler_once(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-flow-refund1", "tokens_200")
    paid = await provider_id(admin, created["id"])
    await fake.succeed(paid)
    later = datetime.now(UTC) + timedelta(minutes=30)
    assert await jobs.reconcile_payments(now=later) == run(1, 1, 0)
    user_id = await buyer(admin, "device-flow-refund1")
    assert await db.balance(admin, user_id) == 5 + 200

    await fake.refund(paid, 29900)  # the whole payment; notification lost
    first, second = await asyncio.gather(
        jobs.reconcile_payments(now=later), jobs.reconcile_payments(now=later)
    )
    assert first["refunds"] + second["refunds"] == 1
    assert await db.balance(admin, user_id) == 5
    assert await reversals(admin, user_id) == [-200]
    assert (await payment_row(admin, created["id"]))["status"] == "refunded"
    assert await jobs.reconcile_payments(now=later) == run(0, 0, 0)


async def test_lost_success_and_lost_partial_refunds_over_several_pages_all_reach_the_books(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing was delivered: the payment's success and three partial refunds,
    listed two a page. The run's refund pass (first, so that no backlog of
    open payments can crowd it out) credits the payment before taking back
    what the refunds pay for; the payment is then no longer open to ask about."""
    monkeypatch.setattr(yookassa, "REFUND_PAGE_SIZE", 2)
    created = await create(http, "device-flow-refund2", "tokens_200")
    paid = await provider_id(admin, created["id"])
    await fake.succeed(paid)
    for _ in range(3):  # three quarters of 299.00 RUB
        await fake.refund(paid, 7475)
    later = datetime.now(UTC) + timedelta(minutes=30)
    assert await jobs.reconcile_payments(now=later) == run(0, 0, 0, refunds=3)
    assert len(fake.requests_to("GET", "/v3/refunds")) == 2
    user_id = await buyer(admin, "device-flow-refund2")
    assert sorted(await reversals(admin, user_id)) == [-50, -50, -50]
    purchases = [row["amount"] for row in await db.ledger(admin, user_id) if row["type"] == "purchase"]
    assert purchases == [200]
    assert await db.balance(admin, user_id) == 5 + 50
    assert (await payment_row(admin, created["id"]))["refunded_amount"] == 3 * 7475


async def test_refunds_are_listed_only_within_the_lookback_and_a_failed_listing_is_retried(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-flow-refund3")
    paid = await provider_id(admin, created["id"])
    await fake.succeed(paid)
    later = datetime.now(UTC) + timedelta(minutes=30)
    await jobs.reconcile_payments(now=later)
    await fake.refund(paid, 9900)
    user_id = await buyer(admin, "device-flow-refund3")

    # four days on, the refund is older than the three-day lookback
    assert await jobs.reconcile_payments(now=later + timedelta(days=4)) == run(0, 0, 0)
    fake.go_down()
    assert await jobs.reconcile_payments(now=later) == run(0, 0, 1)  # the listing
    assert await db.balance(admin, user_id) == 5 + 50
    fake.recover()
    assert await jobs.reconcile_payments(now=later) == run(0, 0, 0, refunds=1)
    assert await db.balance(admin, user_id) == 5


async def test_one_refund_that_fails_and_ones_not_ours_or_unreadable_do_not_hold_back_the_rest(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    """Newest first: a refund listed before the good one whose payment
    YooKassa no longer answers for, a refund of another product's payment on
    a shared shop, and a listed refund without an amount."""
    good = await create(http, "device-flow-refund4")
    good_paid = await provider_id(admin, good["id"])
    await fake.succeed(good_paid)
    later = datetime.now(UTC) + timedelta(minutes=30)
    await jobs.reconcile_payments(now=later)  # the good payment is credited
    await fake.refund(good_paid, 9900)

    stuck = await create(http, "device-flow-refund5")
    stuck_paid = await provider_id(admin, stuck["id"])
    await fake.succeed(stuck_paid)
    await fake.refund(stuck_paid, 9900)
    fake.payments.pop(stuck_paid)  # its success can no longer be read back
    fake.refunds["rf-not-ours"] = {
        **next(iter(fake.refunds.values())),
        "id": "rf-not-ours",
        "payment_id": "pp-not-ours",
    }
    fake.refunds["rf-unreadable"] = {
        "id": "rf-unreadable",
        "payment_id": good_paid,
        "status": "succeeded",
        "created_at": "2999-01-01T00:00:00.000Z",
    }

    # the stuck payment's own check fails, and so does its refund; the good one is applied
    assert await jobs.reconcile_payments(now=later) == run(1, 0, 2, refunds=1)
    assert await db.balance(admin, await buyer(admin, "device-flow-refund4")) == 5
    assert await db.balance(admin, await buyer(admin, "device-flow-refund5")) == 5
    assert await admin.fetchval("select count(*) from payment_refunds") == 1


async def test_listing_refunds_asks_for_no_page_once_out_of_time(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yookassa, "REFUND_PAGE_SIZE", 2)
    created = await create(http, "device-flow-refund6", "tokens_200")
    paid = await provider_id(admin, created["id"])
    await fake.succeed(paid)
    for _ in range(3):
        await fake.refund(paid, 7475)
    client = yookassa.default_client()
    since = datetime.now(UTC) - timedelta(hours=1)
    assert len(await client.succeeded_refunds_since(since)) == 3
    assert len(await client.succeeded_refunds_since(since, stop_at=time.monotonic() - 1)) == 2
    assert len(fake.requests_to("GET", "/v3/refunds")) == 2 + 1
