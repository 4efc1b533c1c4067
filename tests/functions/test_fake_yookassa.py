"""functions/fake_yookassa.py over real HTTP: it must behave like YooKassa
where our code depends on it, or the client's tests prove nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from functions.fake_yookassa import (
    FakeTransitionError,
    FakeYooKassa,
    InProcessServer,
    serve_in_process,
    start_fake_yookassa,
)
from functions.yookassa import parse_notification

EVENTS = Path(__file__).parent.parent / "events" / "yookassa"

A_PAYMENT = {
    "amount": {"value": "99.00", "currency": "RUB"},
    "capture": True,
    "confirmation": {"type": "redirect", "return_url": "https://app.dreamlens.test/return"},
    "description": "50 tokens",
    "metadata": {"payment_id": "0d9ea1a4-3c39-4b8e-bb62-2b4f4f0b1c55"},
}


class Webhook:
    """Where the fake delivers notifications: a real HTTP endpoint."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/api/payments/webhook", self.receive, methods=["POST"])])

    async def receive(self, request: Request) -> JSONResponse:
        self.received.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})


@pytest.fixture(scope="module")
async def webhook() -> AsyncIterator[tuple[Webhook, InProcessServer]]:
    receiver = Webhook()
    server = await serve_in_process(receiver.app)
    try:
        yield receiver, server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def running_fake(webhook: tuple[Webhook, InProcessServer]) -> AsyncIterator[FakeYooKassa]:
    """One server per module (starting and stopping uvicorn costs more than
    the tests), reset before every test."""
    started = await start_fake_yookassa(webhook_url=f"{webhook[1].base_url}/api/payments/webhook")
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
def fake(running_fake: FakeYooKassa, webhook: tuple[Webhook, InProcessServer]) -> FakeYooKassa:
    running_fake.reset()
    webhook[0].received.clear()
    return running_fake


@pytest.fixture
async def http(fake: FakeYooKassa) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.base_url, auth=(fake.shop_id, fake.secret_key)) as client:
        yield client


async def create(http: httpx.AsyncClient, key: str = "key-1", body: Any = None) -> httpx.Response:
    return await http.post(
        "/v3/payments", json=A_PAYMENT if body is None else body, headers={"Idempotence-Key": key}
    )


# ---------------------------------------------------------------------- API


async def test_create_answers_a_pending_payment_with_a_confirmation_url(
    fake: FakeYooKassa, http: httpx.AsyncClient
) -> None:
    response = await create(http)
    assert response.status_code == 200
    payment = response.json()
    assert (payment["status"], payment["paid"], payment["amount"]) == ("pending", False, A_PAYMENT["amount"])
    assert payment["confirmation"]["type"] == "redirect"
    assert payment["confirmation"]["confirmation_url"].startswith(fake.base_url)
    assert payment["metadata"] == A_PAYMENT["metadata"]
    fetched = await http.get(f"/v3/payments/{payment['id']}")
    assert fetched.json() == payment


async def test_same_key_same_body_is_the_same_payment(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    first, second = await create(http), await create(http)
    assert first.json() == second.json()
    assert len(fake.payments) == 1
    other = await create(http, key="key-2")
    assert other.json()["id"] != first.json()["id"]


async def test_same_key_other_body_is_refused(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    await create(http)
    response = await create(http, body={**A_PAYMENT, "amount": {"value": "1.00", "currency": "RUB"}})
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["parameter"]) == ("invalid_request", "Idempotence-Key")
    assert len(fake.payments) == 1


@pytest.mark.parametrize("key", [None, "", "k" * 65])
async def test_a_post_needs_a_short_idempotence_key(fake: FakeYooKassa, key: str | None) -> None:
    headers = {} if key is None else {"Idempotence-Key": key}
    async with httpx.AsyncClient(base_url=fake.base_url, auth=(fake.shop_id, fake.secret_key)) as client:
        response = await client.post("/v3/payments", json=A_PAYMENT, headers=headers)
    assert response.status_code == 400
    assert fake.payments == {}


@pytest.mark.parametrize("auth", [None, ("100500", "test_wrong"), ("other-shop", "x")])
async def test_basic_auth_is_checked(fake: FakeYooKassa, auth: tuple[str, str] | None) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url, auth=auth) as client:
        response = await client.post("/v3/payments", json=A_PAYMENT, headers={"Idempotence-Key": "k"})
        fetched = await client.get("/v3/payments/anything")
    assert response.status_code == fetched.status_code == 401
    error = response.json()
    assert (error["type"], error["code"]) == ("error", "invalid_credentials")
    assert fake.payments == {}


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"amount": {"value": 99.0, "currency": "RUB"}}, "amount.value"),
        ({"amount": {"value": "99.001", "currency": "RUB"}}, "amount.value"),
        ({"amount": {"value": "0.00", "currency": "RUB"}}, "amount.value"),
        ({"amount": {"value": "99.00", "currency": "rub"}}, "amount.currency"),
        ({"capture": "yes"}, "capture"),
        ({"confirmation": {"type": "redirect"}}, "confirmation.return_url"),
        ({"confirmation": {"type": "qr"}}, "confirmation.type"),
        ({"description": "x" * 129}, "description"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"payment_id": 42}}, "metadata"),
    ],
)
async def test_bodies_yookassa_would_refuse_are_refused(
    fake: FakeYooKassa, http: httpx.AsyncClient, changes: dict[str, Any], parameter: str
) -> None:
    response = await create(http, body={**A_PAYMENT, **changes})
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["parameter"]) == ("invalid_request", parameter)
    assert fake.payments == {}


async def test_unknown_objects_are_not_found(http: httpx.AsyncClient) -> None:
    for path in ("/v3/payments/2f3b588d-000f-5000-8000-1d6e87c7fbde", "/v3/refunds/nope"):
        response = await http.get(path)
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"


# ------------------------------------------------------- provider's events


async def test_success_is_notified_in_yookassa_shape(
    fake: FakeYooKassa, http: httpx.AsyncClient, webhook: tuple[Webhook, InProcessServer]
) -> None:
    payment_id = (await create(http)).json()["id"]
    sent = await fake.succeed(payment_id)
    [received] = webhook[0].received
    assert received == sent
    assert (received["type"], received["event"]) == ("notification", "payment.succeeded")
    assert (received["object"]["id"], received["object"]["status"], received["object"]["paid"]) == (
        payment_id,
        "succeeded",
        True,
    )
    assert [d.status_code for d in fake.deliveries] == [200]
    notification = parse_notification(json.dumps(received).encode())
    assert (notification.payment_id, notification.object_status) == (payment_id, "succeeded")
    assert (await http.get(f"/v3/payments/{payment_id}")).json()["status"] == "succeeded"


async def test_notification_carries_what_the_real_sample_carries(
    fake: FakeYooKassa, http: httpx.AsyncClient
) -> None:
    """Keeps the fake honest: the captured notification's payment fields
    (bar the card network's authorization details) are all there."""
    real = json.loads((EVENTS / "payment.waiting_for_capture.json").read_text(encoding="utf-8"))
    payment_id = (await create(http)).json()["id"]
    sent = await fake.wait_for_capture(payment_id)
    assert set(sent) == set(real)
    missing = set(real["object"]) - set(sent["object"]) - {"authorization_details", "expires_at"}
    assert missing == set()
    assert set(sent["object"]["amount"]) == set(real["object"]["amount"])


async def test_two_stage_payment_then_cancel(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    payment_id = (await create(http)).json()["id"]
    waiting = await fake.wait_for_capture(payment_id)
    assert (waiting["event"], waiting["object"]["status"], waiting["object"]["paid"]) == (
        "payment.waiting_for_capture",
        "waiting_for_capture",
        True,
    )
    canceled = await fake.cancel(payment_id)
    assert canceled["object"]["status"] == "canceled"
    assert canceled["object"]["cancellation_details"]["party"] == "yoo_money"
    with pytest.raises(FakeTransitionError):
        await fake.succeed(payment_id)


async def test_partial_refunds_up_to_the_amount(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    payment_id = (await create(http)).json()["id"]
    with pytest.raises(FakeTransitionError):
        await fake.refund(payment_id, 100)  # not paid yet
    await fake.succeed(payment_id)
    first = await fake.refund(payment_id, 2550)
    assert first["event"] == "refund.succeeded"
    assert (first["object"]["payment_id"], first["object"]["amount"]) == (
        payment_id,
        {"value": "25.50", "currency": "RUB"},
    )
    assert parse_notification(first).refund_amount == 2550
    payment = (await http.get(f"/v3/payments/{payment_id}")).json()
    assert (payment["status"], payment["refunded_amount"]["value"]) == ("succeeded", "25.50")
    with pytest.raises(FakeTransitionError):
        await fake.refund(payment_id, 7351)
    await fake.refund(payment_id, 7350)
    assert (await http.get(f"/v3/payments/{payment_id}")).json()["refundable"] is False
    refund = (await http.get(f"/v3/refunds/{first['object']['id']}")).json()
    assert refund == first["object"]


async def test_an_unreachable_webhook_is_recorded(http: httpx.AsyncClient) -> None:
    fake = await start_fake_yookassa(webhook_url="http://127.0.0.1:9/unreachable")
    try:
        async with httpx.AsyncClient(base_url=fake.base_url, auth=(fake.shop_id, fake.secret_key)) as client:
            payment_id = (await create(client)).json()["id"]
        await fake.succeed(payment_id)
    finally:
        await fake.stop()
    [delivery] = fake.deliveries
    assert delivery.status_code is None and delivery.error


# ------------------------------------------------------------------ control


async def test_control_endpoints_drive_the_fake_over_http(
    fake: FakeYooKassa, http: httpx.AsyncClient, webhook: tuple[Webhook, InProcessServer]
) -> None:
    payment_id = (await create(http)).json()["id"]
    succeeded = await http.post(f"/_fake/payments/{payment_id}/succeed")
    assert succeeded.status_code == 200 and succeeded.json()["event"] == "payment.succeeded"
    refunded = await http.post(f"/_fake/payments/{payment_id}/refund", json={"amount": "10.00"})
    assert refunded.json()["object"]["amount"]["value"] == "10.00"
    again = await http.post(f"/_fake/payments/{payment_id}/cancel")
    assert again.status_code == 400
    assert [n["event"] for n in webhook[0].received] == ["payment.succeeded", "refund.succeeded"]


async def test_checkout_page_pays_and_returns_to_the_shop(
    fake: FakeYooKassa, http: httpx.AsyncClient
) -> None:
    payment = (await create(http)).json()
    page = await http.get(payment["confirmation"]["confirmation_url"])
    assert page.status_code == 200 and "99.00 RUB" in page.text
    paid = await http.post(f"/_fake/checkout/{payment['id']}?outcome=succeed")
    assert paid.status_code == 303
    assert paid.headers["location"] == A_PAYMENT["confirmation"]["return_url"]  # type: ignore[index]
    assert fake.payments[payment["id"]]["status"] == "succeeded"


async def test_down_and_back_up(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    assert (await http.post("/_fake/mode", json={"mode": "down"})).status_code == 200
    down = await create(http)
    assert down.status_code == 503 and down.json()["code"] == "internal_server_error"
    await http.post("/_fake/mode", json={"mode": "up"})
    assert (await create(http)).status_code == 200
    # every API request is recorded, failed ones included
    assert [r.path for r in fake.requests] == ["/v3/payments", "/v3/payments"]
    assert (await http.post("/_fake/mode", json={"mode": "sideways"})).status_code == 400


async def test_fail_next_fails_that_many_then_works(fake: FakeYooKassa, http: httpx.AsyncClient) -> None:
    fake.fail_next(2, status=500)
    statuses = [(await create(http)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


async def test_slow_requests_finish_when_the_fake_recovers(
    fake: FakeYooKassa, http: httpx.AsyncClient
) -> None:
    fake.go_slow(60)
    with pytest.raises(httpx.ReadTimeout):
        await http.get("/v3/payments/x", timeout=0.1)
    fake.recover()
    assert (await http.get("/v3/payments/x")).status_code == 404
