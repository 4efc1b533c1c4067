"""The webhook over real HTTP on localhost: the fake YooKassa delivers its
notifications to the webhook app served by uvicorn (trusted networks set to
127.0.0.1/32, as a local server using the fake runs), and many deliveries of
one notification arrive at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from database import config, pool
from functions import jobs, settings
from functions.fake_yookassa import FakeYooKassa, InProcessServer
from functions.yookassa import close_default_client
from repositories.audit import find_violations
from tests import db
from tests.functions.payment_support import (
    WEBHOOK,
    configure_provider,
    create,
    payment_row,
    payments_server,  # noqa: F401 (a fixture)
    release_together,
    running_fake,  # noqa: F401 (a fixture)
    user_headers,
)

CONCURRENT_DELIVERIES = 20


@pytest.fixture
async def fake(
    running_fake: FakeYooKassa,  # noqa: F811
    payments_server: InProcessServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    admin: asyncpg.Connection,
) -> AsyncIterator[FakeYooKassa]:
    """The fake, delivering to the served webhook; a pool wide enough for
    concurrent requests; afterwards the books must balance."""
    running_fake.reset()
    running_fake.webhook_url = f"{payments_server.base_url}{WEBHOOK}"
    configure_provider(monkeypatch, running_fake)
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32")
    settings.reset()
    await pool.close_pool()
    config.configure(pool_max_size=10)
    yield running_fake
    running_fake.recover()
    running_fake.webhook_url = None
    await close_default_client()
    assert await db.audit_problems(admin) == []
    assert await find_violations() == []
    await pool.close_pool()


def provider_id_of(created: dict[str, Any]) -> str:
    # the fake's checkout page: .../_fake/checkout/<provider payment id>
    return str(created["confirmation_url"].rsplit("/", 1)[1])


async def buyer(admin: asyncpg.Connection, device: str) -> UUID:
    user_id: UUID = await admin.fetchval("select id from users where device_id = $1", device)
    return user_id


async def test_the_payer_pays_and_yookassa_delivers_over_http(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-http-buyer", "tokens_200", key="http-flow")
    provider_id = provider_id_of(created)

    # the payer pays on YooKassa's page and comes back to the app
    async with httpx.AsyncClient(base_url=fake.base_url) as payer:
        paid = await payer.post(f"/_fake/checkout/{provider_id}", params={"outcome": "succeed"})
    assert paid.status_code == 303
    # YooKassa POSTed payment.succeeded to the webhook, which verified and credited it
    [delivery] = fake.deliveries
    assert (delivery.notification["event"], delivery.status_code) == ("payment.succeeded", 200)
    user_id = await buyer(admin, "device-http-buyer")
    assert await db.balance(admin, user_id) == 5 + 200

    shown = await http.get(f"/api/payments/{created['id']}", headers=user_headers("device-http-buyer"))
    assert (shown.status_code, shown.json()["status"]) == (200, "succeeded")

    # the shop refunds half: YooKassa delivers refund.succeeded
    await fake.refund(provider_id, 14950)
    assert [(d.notification["event"], d.status_code) for d in fake.deliveries][-1] == (
        "refund.succeeded",
        200,
    )
    assert await db.balance(admin, user_id) == 5 + 100
    row = await payment_row(admin, created["id"])
    assert (row["status"], row["refunded_amount"]) == ("succeeded", 14950)


async def test_a_canceled_payment_is_delivered_and_credits_nothing(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-http-cancel")
    async with httpx.AsyncClient(base_url=fake.base_url) as payer:
        await payer.post(f"/_fake/checkout/{provider_id_of(created)}", params={"outcome": "cancel"})
    assert [d.status_code for d in fake.deliveries] == [200]
    assert (await payment_row(admin, created["id"]))["status"] == "canceled"
    assert await db.balance(admin, await buyer(admin, "device-http-cancel")) == 5


async def test_the_same_notification_twenty_times_at_once_credits_once(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = await create(http, "device-http-race1", "tokens_200")
    fake.webhook_url = None  # the test delivers it, many times at once
    notification = await fake.succeed(provider_id_of(created))

    # every delivery is verified at YooKassa before any is applied: all twenty
    # statements race for the payment
    fake.go_slow(60)
    *responses, _ = await asyncio.gather(
        *(http.post(WEBHOOK, json=notification) for _ in range(CONCURRENT_DELIVERIES)),
        release_together(fake, f"/v3/payments/{provider_id_of(created)}", CONCURRENT_DELIVERIES),
    )
    assert [r.status_code for r in responses] == [200] * CONCURRENT_DELIVERIES
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes == ["credited"] + ["unchanged"] * (CONCURRENT_DELIVERIES - 1)
    user_id = await buyer(admin, "device-http-race1")
    assert await db.balance(admin, user_id) == 5 + 200
    purchases = [row for row in await db.ledger(admin, user_id) if row["type"] == "purchase"]
    assert [row["idempotency_key"] for row in purchases] == [f"payment:{created['id']}"]


async def test_deliveries_and_two_reconcilers_racing_credit_once(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    """The webhook arriving while the reconciler finds the same payment open."""
    created = await create(http, "device-http-race2", "pro_month")
    fake.webhook_url = None
    notification = await fake.succeed(provider_id_of(created))
    later = datetime.now(UTC) + timedelta(hours=1)

    fake.go_slow(60)
    results = await asyncio.gather(
        *(http.post(WEBHOOK, json=notification) for _ in range(10)),
        jobs.reconcile_payments(now=later),
        jobs.reconcile_payments(now=later),
        release_together(fake, f"/v3/payments/{provider_id_of(created)}", 12),
    )
    deliveries, reconciled = results[:10], results[10:12]
    assert all(r.status_code == 200 for r in deliveries)
    credited = sum(r.json()["outcome"] == "credited" for r in deliveries)
    assert credited + sum(run["changed"] for run in reconciled) == 1
    user_id = await buyer(admin, "device-http-race2")
    assert await db.balance(admin, user_id) == 5 + 200
    subscriptions = await admin.fetch("select plan from subscriptions where user_id = $1", user_id)
    assert [row["plan"] for row in subscriptions] == ["pro"]


async def test_outside_the_trusted_networks_a_delivery_is_refused(
    fake: FakeYooKassa, http: httpx.AsyncClient, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With YooKassa's published networks (the default), localhost is a stranger,
    whatever X-Forwarded-For says."""
    created = await create(http, "device-http-strngr")
    monkeypatch.delenv("YOOKASSA_TRUSTED_NETWORKS")
    settings.reset()
    notification = await fake.succeed(provider_id_of(created))
    assert [d.status_code for d in fake.deliveries] == [403]
    forged = await http.post(WEBHOOK, json=notification, headers={"X-Forwarded-For": "185.71.76.1"})
    assert (forged.status_code, forged.json()["error"]) == (403, "forbidden")
    assert (await payment_row(admin, created["id"]))["status"] == "pending"
    assert await db.balance(admin, await buyer(admin, "device-http-strngr")) == 5
