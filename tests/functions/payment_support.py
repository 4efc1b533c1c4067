"""What the payments and webhook tests share: YooKassa's captured
notifications and variants built from them, a fake YooKassa configured as
the provider, requests to the handlers, and reading the books back."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from functions import payments, settings, webhook
from functions.app import build_app
from functions.fake_yookassa import FakeYooKassa, InProcessServer, serve_in_process, start_fake_yookassa
from tests.functions.callers import metric_lines
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke

EVENTS = Path(__file__).parent.parent / "events" / "yookassa"
VERSIONS = sorted(EVENT_BUILDERS)
RETURN_URL = "https://app.dreamlens.test/payments/return"
# in YooKassa's published networks, written as API Gateway's samples write it
TRUSTED_IP = "185.71.76.1/32"
WEBHOOK = "/api/payments/webhook"


# ------------------------------------------------------------ notifications


def sample(name: str) -> dict[str, Any]:
    """A notification exactly as YooKassa's SDK tests carry it."""
    loaded: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text(encoding="utf-8"))
    return loaded


def payment_notification(event: str, provider_payment: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The captured payment.waiting_for_capture sample, turned into `event`
    for one of the fake's payments (its id, amount; the status the event names
    unless `changes` say otherwise)."""
    notification = sample("payment.waiting_for_capture")
    notification["event"] = event
    notification["object"].update(
        id=provider_payment["id"],
        status=event.split(".", 1)[1],
        amount=copy.deepcopy(provider_payment["amount"]),
        metadata=copy.deepcopy(provider_payment.get("metadata", {})),
    )
    notification["object"].update(changes)
    return notification


def refund_notification(refund: dict[str, Any]) -> dict[str, Any]:
    """The captured refund.succeeded sample for one of the fake's refunds, its
    amount a JSON number as in the sample."""
    notification = sample("refund.succeeded")
    notification["object"].update(
        id=refund["id"],
        payment_id=refund["payment_id"],
        amount={"value": float(refund["amount"]["value"]), "currency": refund["amount"]["currency"]},
    )
    return notification


# --------------------------------------------------------------- the fake


@pytest.fixture(scope="module")
async def running_fake() -> AsyncIterator[FakeYooKassa]:
    """One fake per module (uvicorn's start and stop cost more than a test)."""
    started = await start_fake_yookassa()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture(scope="module")
async def payments_server() -> AsyncIterator[InProcessServer]:
    """The payments and webhook functions' app on localhost, as `dreamlens
    serve` runs it: requests come over real HTTP and are served on the test's
    loop (so the pool and the YooKassa client live there too)."""
    server = await serve_in_process(build_app([*payments.routes, *webhook.routes]))
    try:
        yield server
    finally:
        await server.stop()


async def create(
    http: httpx.AsyncClient, device: str, package_id: str = "tokens_50", key: str | None = None
) -> Any:
    """POST /api/payments over `http` as the device; the 201's body."""
    response = await http.post(
        "/api/payments", json={"package_id": package_id}, headers=user_headers(device, key)
    )
    assert response.status_code == 201, response.text
    return response.json()


async def release_together(fake: FakeYooKassa, path: str, count: int) -> None:
    """Hold YooKassa's answers on `path` until `count` requests are waiting for
    them, then answer them all at once: racers are certain to overlap."""
    while len(fake.requests_to("GET", path)) < count:
        await asyncio.sleep(0.005)
    fake.recover()


def configure_provider(monkeypatch: pytest.MonkeyPatch, fake: FakeYooKassa) -> None:
    """The functions' YooKassa settings point at the fake."""
    monkeypatch.setenv("YOOKASSA_SHOP_ID", fake.shop_id)
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", fake.secret_key)
    monkeypatch.setenv("YOOKASSA_API_URL", fake.api_url)
    monkeypatch.setenv("YOOKASSA_RETURN_URL", RETURN_URL)
    monkeypatch.delenv("YOOKASSA_SECRET_KEY_SECRET_ARN", raising=False)
    monkeypatch.delenv("YOOKASSA_TRUSTED_NETWORKS", raising=False)
    settings.reset()


# ------------------------------------------------------- the Lambda handlers


def user_headers(device: str, key: str | None = None) -> dict[str, str]:
    headers = {"X-Device-Id": device, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


async def buy(
    device: str,
    package_id: str = "tokens_50",
    key: str | None = None,
    version: str = "v2",
    context: Any = None,
) -> Invocation:
    event = EVENT_BUILDERS[version](
        "POST", "/api/payments", headers=user_headers(device, key), body={"package_id": package_id}
    )
    return await invoke(payments.handler, event, context)


async def deliver(
    notification: dict[str, Any] | bytes | str,
    version: str = "v2",
    source_ip: str = TRUSTED_IP,
    headers: dict[str, str] | None = None,
    context: Any = None,
) -> Invocation:
    """A notification to the webhook handler as API Gateway passes it on."""
    event = EVENT_BUILDERS[version](
        "POST",
        WEBHOOK,
        headers={"Content-Type": "application/json", **(headers or {})},
        body=notification,
        source_ip=source_ip,
    )
    return await invoke(webhook.handler, event, context)


# ------------------------------------------------------------ reading back


async def payment_row(admin: asyncpg.Connection, payment_id: UUID | str) -> dict[str, Any]:
    row = await admin.fetchrow("select * from payments where id = $1", UUID(str(payment_id)))
    assert row is not None
    return dict(row)


async def user_of_device(admin: asyncpg.Connection, device: str) -> UUID:
    user_id: UUID = await admin.fetchval("select id from users where device_id = $1", device)
    return user_id


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]


def webhook_outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line["Outcome"] for line in metric_lines(caplog) if "WebhookNotifications" in line]


def capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Request and metric lines from here on (what came before is dropped)."""
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    caplog.clear()
