"""functions/webhook.py through `handler(event, context)` with REST (v1) and
HTTP API (v2) events from YooKassa's addresses: YooKassa's own sample
notifications and variants of them, the status re-read from the fake
YooKassa over real HTTP, the database and the provider failing on the way.
Concurrent deliveries over real HTTP are in test_webhook_http.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from database import config, pool
from functions import settings, webhook
from functions.fake_yookassa import FakeYooKassa
from functions.yookassa import close_default_client
from repositories import tokens
from repositories.audit import find_violations
from tests import db
from tests.functions.lambda_events import EVENT_BUILDERS, LambdaContext, LambdaRuntime, invoke
from tests.functions.payment_support import (
    TRUSTED_IP,
    VERSIONS,
    WEBHOOK,
    buy,
    capture_logs,
    configure_provider,
    deliver,
    metric_lines,
    payment_notification,
    payment_row,
    refund_notification,
    request_lines,
    running_fake,  # noqa: F401 (a fixture)
    sample,
    webhook_outcomes,
)

# nothing listens on port 1: the connection is refused at once
UNREACHABLE = "postgresql://dreamlens@127.0.0.1:1/dreamlens"


@pytest.fixture
async def fake(
    running_fake: FakeYooKassa,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    lambda_runtime: LambdaRuntime,
    admin: asyncpg.Connection,
) -> AsyncIterator[FakeYooKassa]:
    """The fake as the functions' YooKassa (its notifications are handed to
    the handler by the test); afterwards the books must balance."""
    running_fake.reset()
    running_fake.webhook_url = None
    configure_provider(monkeypatch, running_fake)
    yield running_fake
    running_fake.recover()
    await lambda_runtime.run(close_default_client)
    assert await db.audit_problems(admin) == []
    assert await lambda_runtime.run(find_violations) == []


class Bought:
    """A payment made through the payments handler, attached at the fake."""

    def __init__(self, payment_id: str, user_id: UUID, provider_id: str, provider: dict[str, Any]) -> None:
        self.id = payment_id
        self.user_id = user_id
        self.provider_id = provider_id
        self.provider = provider


async def bought(
    admin: asyncpg.Connection, fake: FakeYooKassa, device: str, package_id: str = "tokens_50"
) -> Bought:
    response = await buy(device, package_id)
    assert response.status == 201
    row = await payment_row(admin, response.body["id"])
    provider_id = row["provider_payment_id"]
    return Bought(response.body["id"], row["user_id"], provider_id, fake.payments[provider_id])


async def purchase_rows(admin: asyncpg.Connection, user_id: UUID) -> list[dict[str, Any]]:
    return [row for row in await db.ledger(admin, user_id) if row["type"] in ("purchase", "plan_grant")]


# ------------------------------------------------------- the money arriving


@pytest.mark.parametrize("version", VERSIONS)
async def test_payment_succeeded_credits_the_package_once_in_one_round_trip(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    payment = await bought(admin, fake, "device-success-1", "tokens_200")
    notification = await fake.succeed(payment.provider_id)
    capture_logs(caplog)

    response = await deliver(notification, version)
    assert (response.status, response.body) == (200, {"outcome": "credited"})
    assert await db.balance(admin, payment.user_id) == 5 + 200
    [purchase] = await purchase_rows(admin, payment.user_id)
    assert (purchase["amount"], purchase["type"], purchase["idempotency_key"]) == (
        200,
        "purchase",
        f"payment:{payment.id}",
    )
    row = await payment_row(admin, payment.id)
    assert row["status"] == "succeeded" and row["paid_at"] is not None
    # the credit, verified at YooKassa first, is ONE database round trip
    [line] = request_lines(caplog)
    assert (line["route"], line["status"], line["db_statements"], line["db_round_trips"]) == (
        "/api/payments/webhook",
        200,
        1,
        db.trips(1),
    )
    assert fake.requests_to("GET", f"/v3/payments/{payment.provider_id}")
    metrics = metric_lines(caplog)
    assert [m["TokensCredited"] for m in metrics if "TokensCredited" in m] == [200]

    # YooKassa delivers again: 200, and nothing moves
    again = await deliver(notification, version)
    assert (again.status, again.body) == (200, {"outcome": "unchanged"})
    assert await db.balance(admin, payment.user_id) == 205
    assert len(await purchase_rows(admin, payment.user_id)) == 1
    assert webhook_outcomes(caplog) == ["credited", "unchanged"]


async def test_a_plan_package_grants_its_plan_with_its_tokens(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    payment = await bought(admin, fake, "device-planbuy-1", "pro_month")
    response = await deliver(await fake.succeed(payment.provider_id), "v1")
    assert response.body == {"outcome": "credited"}
    [grant] = await purchase_rows(admin, payment.user_id)
    assert (grant["type"], grant["amount"]) == ("plan_grant", 200)
    plan = await admin.fetchrow("select plan, status from subscriptions where user_id = $1", payment.user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")


@pytest.mark.parametrize("version", VERSIONS)
async def test_yookassas_samples_walk_a_payment_through_its_states(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    """waiting_for_capture, then succeeded, then a stale canceled: the captured
    sample with our payment's id, each applied as the API tells it."""
    payment = await bought(admin, fake, "device-samples-1")
    await fake.wait_for_capture(payment.provider_id)
    waiting = payment_notification("payment.waiting_for_capture", payment.provider)
    assert (await deliver(waiting, version)).body == {"outcome": "applied"}
    assert (await payment_row(admin, payment.id))["status"] == "waiting_for_capture"
    assert await db.balance(admin, payment.user_id) == 5

    await fake.succeed(payment.provider_id)
    succeeded = payment_notification("payment.succeeded", payment.provider, refundable=True)
    assert (await deliver(succeeded, version)).body == {"outcome": "credited"}
    assert await db.balance(admin, payment.user_id) == 55

    # a canceled that says so in its body: YooKassa's API still says succeeded
    canceled = payment_notification("payment.canceled", payment.provider, paid=False)
    assert (await deliver(canceled, version)).body == {"outcome": "unchanged"}
    assert (await payment_row(admin, payment.id))["status"] == "succeeded"
    assert await db.balance(admin, payment.user_id) == 55


@pytest.mark.parametrize("version", VERSIONS)
async def test_payment_canceled_marks_it_and_credits_nothing(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    payment = await bought(admin, fake, "device-cancel-01")
    await fake.cancel(payment.provider_id)
    canceled = payment_notification(
        "payment.canceled",
        payment.provider,
        paid=False,
        cancellation_details={"party": "yoo_money", "reason": "expired_on_confirmation"},
    )
    assert (await deliver(canceled, version)).body == {"outcome": "applied"}
    assert (await payment_row(admin, payment.id))["status"] == "canceled"
    assert await db.balance(admin, payment.user_id) == 5
    # and a forged succeeded for it later changes nothing
    forged = payment_notification("payment.succeeded", payment.provider)
    assert (await deliver(forged, version)).body == {"outcome": "unchanged"}
    assert await purchase_rows(admin, payment.user_id) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_body_saying_succeeded_while_the_api_says_pending_credits_nothing(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    payment = await bought(admin, fake, "device-liar-0001")
    forged = payment_notification("payment.succeeded", payment.provider, paid=True)
    response = await deliver(forged, version)
    assert (response.status, response.body) == (200, {"outcome": "unchanged"})
    assert (await payment_row(admin, payment.id))["status"] == "pending"
    assert await db.balance(admin, payment.user_id) == 5
    assert await purchase_rows(admin, payment.user_id) == []


# ----------------------------------------------------------------- refunds


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_refund_after_a_partial_spend_takes_back_what_is_left(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection, lambda_runtime: LambdaRuntime
) -> None:
    payment = await bought(admin, fake, "device-refund-01", "tokens_200")
    assert (await deliver(await fake.succeed(payment.provider_id), version)).body == {"outcome": "credited"}

    async def spend_most() -> None:
        await tokens.spend(payment.user_id, 150, "generation:spent-before-the-refund")

    await lambda_runtime.run(spend_most)
    assert await db.balance(admin, payment.user_id) == 55

    refund = await fake.refund(payment.provider_id, 29900)
    notification = refund_notification(refund["object"])
    assert isinstance(notification["object"]["amount"]["value"], float)  # as in YooKassa's sample
    response = await deliver(notification, version)
    assert (response.status, response.body) == (200, {"outcome": "applied"})
    # 200 tokens were bought and 150 spent: the 55 left go back, never below zero
    assert await db.balance(admin, payment.user_id) == 0
    row = await payment_row(admin, payment.id)
    assert (row["status"], row["refunded_amount"], row["refund_shortfall"]) == ("refunded", 29900, 145)
    reversal = [r for r in await db.ledger(admin, payment.user_id) if r["type"] == "reversal"]
    assert [(r["amount"], r["idempotency_key"]) for r in reversal] == [
        (-55, f"reversal:{payment.id}:{refund['object']['id']}")
    ]

    assert (await deliver(notification, version)).body == {"outcome": "unchanged"}
    assert await db.balance(admin, payment.user_id) == 0


async def test_a_partial_refund_takes_back_its_share(fake: FakeYooKassa, admin: asyncpg.Connection) -> None:
    payment = await bought(admin, fake, "device-partref-1", "tokens_200")
    await deliver(await fake.succeed(payment.provider_id))
    refund = await fake.refund(payment.provider_id, 7475)  # a quarter of 299.00
    assert (await deliver(refund_notification(refund["object"]))).body == {"outcome": "applied"}
    assert await db.balance(admin, payment.user_id) == 5 + 150
    assert (await payment_row(admin, payment.id))["status"] == "succeeded"


async def test_the_captured_refund_sample_for_a_payment_we_never_made_changes_nothing(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    response = await deliver(sample("refund.succeeded"))
    assert (response.status, response.body) == (200, {"outcome": "unknown_payment"})
    assert await admin.fetchval("select count(*) from payment_refunds") == 0


# ---------------------------------------------------- what changes nothing


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["deal.closed", "payout.succeeded"])
async def test_events_we_do_not_use_answer_200_and_touch_nothing(
    version: str, name: str, fake: FakeYooKassa, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    payment = await bought(admin, fake, "device-ignored-1")
    capture_logs(caplog)
    response = await deliver(sample(name), version)
    assert (response.status, response.body) == (200, {"outcome": "ignored"})
    [line] = request_lines(caplog)
    assert line["db_statements"] == 0
    assert webhook_outcomes(caplog) == ["ignored"]
    assert [r.method for r in fake.requests] == ["POST"]  # only the create
    assert (await payment_row(admin, payment.id))["status"] == "pending"


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_unknown_payment_answers_200_and_changes_nothing(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    capture_logs(caplog)
    # YooKassa's own sample: a payment neither the fake nor we know
    unknown = await deliver(sample("payment.waiting_for_capture"), version)
    assert (unknown.status, unknown.body) == (200, {"outcome": "unknown_payment"})

    # a payment YooKassa knows but we never stored (another integration's)
    client_body = {
        "amount": {"value": "99.00", "currency": "RUB"},
        "confirmation": {"type": "redirect", "return_url": "https://elsewhere.test"},
    }
    async with httpx.AsyncClient(auth=(fake.shop_id, fake.secret_key)) as http:
        made = await http.post(
            f"{fake.api_url}/payments", json=client_body, headers={"Idempotence-Key": "x1"}
        )
    notification = await fake.succeed(made.json()["id"])
    theirs = await deliver(notification, version)
    assert (theirs.status, theirs.body) == (200, {"outcome": "unknown_payment"})
    assert await admin.fetchval("select count(*) from payments") == 0
    assert await admin.fetchval("select count(*) from token_transactions where type = 'purchase'") == 0
    assert webhook_outcomes(caplog) == ["unknown_payment", "unknown_payment"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("source_ip", "forwarded_for"),
    [
        ("192.168.0.1/32", None),
        ("203.0.113.9", None),
        ("185.71.76.32", None),  # just past YooKassa's 185.71.76.0/27
        ("203.0.113.9", "185.71.76.1"),  # a forged X-Forwarded-For naming YooKassa
        ("203.0.113.9", "185.71.76.1, 77.75.156.11"),
    ],
)
async def test_an_untrusted_source_is_403_and_changes_nothing(
    version: str,
    source_ip: str,
    forwarded_for: str | None,
    fake: FakeYooKassa,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payment = await bought(admin, fake, "device-untrust-1")
    await fake.succeed(payment.provider_id)
    capture_logs(caplog)
    requests_before = len(fake.requests)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    notification = payment_notification("payment.succeeded", payment.provider)
    response = await deliver(notification, version, source_ip=source_ip, headers=headers)
    assert (response.status, response.body["error"]) == (403, "forbidden")
    assert (await payment_row(admin, payment.id))["status"] == "pending"
    assert await db.balance(admin, payment.user_id) == 5
    assert len(fake.requests) == requests_before  # not even asked
    assert webhook_outcomes(caplog) == ["untrusted"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"type": "notification"}',
        b'{"type": "event", "event": "payment.succeeded", "object": {"id": "x"}}',
        b'{"type": "notification", "event": "payment.succeeded", "object": {"id": "../../refunds"}}',
        b'{"type": "notification", "event": "refund.succeeded", "object": {"id": "r1", "payment_id": "p1"}}',
    ],
)
async def test_a_malformed_notification_is_400(
    version: str, body: bytes, fake: FakeYooKassa, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    capture_logs(caplog)
    response = await deliver(body, version)
    assert (response.status, response.body["error"]) == (400, "invalid_request")
    assert fake.requests == []
    assert webhook_outcomes(caplog) == ["malformed"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("declared", [True, False])
async def test_an_oversized_notification_is_413_with_or_without_content_length(
    version: str, declared: bool, fake: FakeYooKassa, caplog: pytest.LogCaptureFixture
) -> None:
    capture_logs(caplog)
    body = b'{"type": "notification", "event": "payment.succeeded", "pad": "' + b"x" * 70_000 + b'"}'
    event = EVENT_BUILDERS[version](
        "POST",
        WEBHOOK,
        headers={"Content-Type": "application/json"},
        body=body,
        source_ip=TRUSTED_IP,
        content_length=declared,
    )
    response = await invoke(webhook.handler, event)
    assert (response.status, response.body["error"]) == (413, "invalid_request")
    assert fake.requests == []
    # too large is not malformed: the webhook's outcome metric stays clean
    assert webhook_outcomes(caplog) == []


async def test_the_webhook_takes_only_post(fake: FakeYooKassa) -> None:
    event = EVENT_BUILDERS["v2"]("GET", "/api/payments/webhook", source_ip=TRUSTED_IP)
    assert (await invoke(webhook.handler, event)).status == 405


# ------------------------------------------------------ failures on the way


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_database_failing_mid_webhook_is_503_and_the_redelivery_credits_once(
    version: str,
    fake: FakeYooKassa,
    admin: asyncpg.Connection,
    lambda_runtime: LambdaRuntime,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payment = await bought(admin, fake, "device-dbdown-01")
    notification = await fake.succeed(payment.provider_id)
    capture_logs(caplog)

    # the database goes away: the runtime's connections close, new ones are refused
    await lambda_runtime.run(pool.close_pool)
    config.configure(url=UNREACHABLE)
    down = await deliver(notification, version)
    assert (down.status, down.body["error"]) == (503, "unavailable")
    assert int(down.headers["retry-after"]) >= 1
    # YooKassa was asked (the status is verified first); the database never answered
    assert fake.requests_to("GET", f"/v3/payments/{payment.provider_id}")
    assert (await payment_row(admin, payment.id))["status"] == "pending"
    assert await db.balance(admin, payment.user_id) == 5

    config.configure(url=schema)  # back
    redelivered = await deliver(notification, version)
    assert (redelivered.status, redelivered.body) == (200, {"outcome": "credited"})
    assert await db.balance(admin, payment.user_id) == 55
    assert len(await purchase_rows(admin, payment.user_id)) == 1
    assert (await deliver(notification, version)).body == {"outcome": "unchanged"}
    assert webhook_outcomes(caplog) == ["unavailable", "credited", "unchanged"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_yookassa_down_during_a_webhook_is_503_and_the_redelivery_credits_once(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    payment = await bought(admin, fake, "device-ykdown-01")
    notification = await fake.succeed(payment.provider_id)
    capture_logs(caplog)
    fake.go_down()
    down = await deliver(notification, version)
    assert (down.status, down.body["error"]) == (503, "unavailable")
    assert int(down.headers["retry-after"]) >= 1
    [line] = request_lines(caplog)
    assert line["db_statements"] == 0  # nothing is applied on the body's word
    assert await db.balance(admin, payment.user_id) == 5

    fake.recover()
    assert (await deliver(notification, version)).body == {"outcome": "credited"}
    assert (await deliver(notification, version)).body == {"outcome": "unchanged"}
    assert await db.balance(admin, payment.user_id) == 55
    assert webhook_outcomes(caplog) == ["unavailable", "credited", "unchanged"]


class ShortOfTime(LambdaContext):
    """An invocation with 3.5 s left: the provider gets the 1 s minimum."""

    def get_remaining_time_in_millis(self) -> int:
        return 3_500


async def test_a_slow_yookassa_during_a_webhook_is_503_before_the_lambda_is_stopped(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    payment = await bought(admin, fake, "device-ykslow-01")
    notification = await fake.succeed(payment.provider_id)
    fake.go_slow(60)
    slow = await deliver(notification, context=ShortOfTime())
    assert (slow.status, slow.body["error"]) == (503, "unavailable")
    assert await db.balance(admin, payment.user_id) == 5
    fake.recover()
    assert (await deliver(notification)).body == {"outcome": "credited"}
    assert await db.balance(admin, payment.user_id) == 55


async def test_yookassa_refusing_our_credentials_is_503_so_the_notification_is_kept(
    fake: FakeYooKassa, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    payment = await bought(admin, fake, "device-ykcreds-1")
    notification = await fake.succeed(payment.provider_id)
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_rotated_away")
    settings.reset()
    refused = await deliver(notification)
    assert (refused.status, refused.body["error"]) == (503, "unavailable")
    assert await db.balance(admin, payment.user_id) == 5
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", fake.secret_key)
    settings.reset()
    assert (await deliver(notification)).body == {"outcome": "credited"}
