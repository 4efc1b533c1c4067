"""functions/payments.py through `handler(event, context)` with REST (v1) and
HTTP API (v2) events, against real PostgreSQL and the fake YooKassa over
real HTTP: the catalogue, creating a payment exactly once per key, reading
it back, and the provider failing on the way."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
import yaml
from moto import mock_aws

from functions import jobs, payments, settings, webhook
from functions.fake_yookassa import FakeYooKassa
from functions.openapi import document
from functions.yookassa import YooKassaClient, YooKassaSettings, close_default_client
from repositories.audit import find_violations
from repositories.payments import Payment
from tests import db
from tests.functions.lambda_events import EVENT_BUILDERS, LambdaContext, LambdaRuntime, invoke
from tests.functions.payment_support import (
    RETURN_URL,
    VERSIONS,
    buy,
    capture_logs,
    configure_provider,
    payment_row,
    request_lines,
    running_fake,  # noqa: F401 (a fixture)
    user_headers,
    user_of_device,
)

SERVERLESS = Path(__file__).parent.parent.parent / "serverless.yml"


@pytest.fixture
async def fake(
    running_fake: FakeYooKassa,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    lambda_runtime: LambdaRuntime,
    admin: asyncpg.Connection,
) -> AsyncIterator[FakeYooKassa]:
    """The fake as the functions' YooKassa; afterwards the books must balance."""
    running_fake.reset()
    running_fake.webhook_url = None
    configure_provider(monkeypatch, running_fake)
    yield running_fake
    running_fake.recover()
    # the handlers' client keeps its connections on the runtime's loop
    await lambda_runtime.run(close_default_client)
    assert await db.audit_problems(admin) == []
    assert await lambda_runtime.run(find_violations) == []


async def payment_count(admin: asyncpg.Connection) -> int:
    count: int = await admin.fetchval("select count(*) from payments")
    return count


async def users_of_device(admin: asyncpg.Connection, device: str) -> int:
    count: int = await admin.fetchval("select count(*) from users where device_id = $1", device)
    return count


def get_payment_event(version: str, payment_id: str, device: str) -> dict[str, Any]:
    return EVENT_BUILDERS[version]("GET", f"/api/payments/{payment_id}", headers=user_headers(device))


# ------------------------------------------------------------------ packages


@pytest.mark.parametrize("version", VERSIONS)
async def test_packages_are_listed_without_sign_in_in_minor_units(version: str, fake: FakeYooKassa) -> None:
    response = await invoke(payments.handler, EVENT_BUILDERS[version]("GET", "/api/packages"))
    assert response.status == 200
    items = response.body["items"]
    assert [item["id"] for item in items] == ["tokens_50", "tokens_200", "pro_month", "premium_month"]
    assert items[0] == {
        "id": "tokens_50",
        "kind": "tokens",
        "tokens": 50,
        "plan": None,
        "period_days": None,
        "amount": 9900,
        "currency": "RUB",
        "description": "50 tokens",
    }
    assert (items[2]["kind"], items[2]["plan"], items[2]["period_days"]) == ("plan", "pro", 30)


async def test_a_retired_package_is_not_listed_and_cannot_be_bought(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    await admin.execute("update token_packages set active = false where id = 'tokens_200'")
    listed = await invoke(payments.handler, EVENT_BUILDERS["v2"]("GET", "/api/packages"))
    assert "tokens_200" not in [item["id"] for item in listed.body["items"]]
    refused = await buy("device-retired-1", "tokens_200", key="retired-1")
    assert (refused.status, refused.body["error"]) == (422, "invalid_request")
    assert await payment_count(admin) == 0
    # a refusal writes nothing: not even the new device's user and bonus
    assert await users_of_device(admin, "device-retired-1") == 0


async def test_a_package_retired_while_the_process_saw_it_on_sale_writes_no_new_user(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    assert (await buy("device-retired-2", "tokens_200")).status == 201  # seen on sale here
    await admin.execute("update token_packages set active = false where id = 'tokens_200'")
    for device in ("device-retired-3", "device-retired-4"):
        refused = await buy(device, "tokens_200")
        assert (refused.status, refused.body["error"]) == (422, "invalid_request")
        assert await users_of_device(admin, device) == 0
    # a caller already known is refused by the payment statement
    again = await buy("device-retired-2", "tokens_200")
    assert (again.status, again.body["error"]) == (422, "invalid_request")
    assert await payment_count(admin) == 1
    assert await db.audit_problems(admin) == []


async def test_a_payment_made_before_its_package_was_retired_is_still_answered_to_a_repeat(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    first = await buy("device-retired-5", "tokens_200", key="bought-before")
    assert first.status == 201
    await admin.execute("update token_packages set active = false where id = 'tokens_200'")
    payments.packages.forget_package_states()  # a process that never saw it on sale
    repeat = await buy("device-retired-5", "tokens_200", key="bought-before")
    assert (repeat.status, repeat.body) == (201, first.body)
    # a new key for the retired package is a new purchase: refused
    refused = await buy("device-retired-5", "tokens_200", key="bought-after")
    assert (refused.status, refused.body["error"]) == (422, "invalid_request")
    assert await payment_count(admin) == 1


# ----------------------------------------------------------------- creating


@pytest.mark.parametrize("version", VERSIONS)
async def test_create_stores_a_pending_payment_and_makes_it_at_yookassa(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    response = await buy("device-buyer-01", "tokens_200", version=version)
    assert response.status == 201
    body = response.body
    assert (body["status"], body["amount"], body["currency"], body["package_id"]) == (
        "pending",
        29900,
        "RUB",
        "tokens_200",
    )
    row = await payment_row(admin, body["id"])
    assert row["user_id"] == await user_of_device(admin, "device-buyer-01")
    assert (row["status"], row["amount"], row["tokens"]) == ("pending", 29900, 200)
    provider = fake.payments[row["provider_payment_id"]]
    assert body["confirmation_url"] == row["confirmation_url"] == provider["confirmation"]["confirmation_url"]
    # what YooKassa was asked for: the price as a decimal string, captured at
    # once, back to the app, and our payment id to find it again
    assert provider["amount"] == {"value": "299.00", "currency": "RUB"}
    assert provider["confirmation"]["return_url"] == RETURN_URL
    assert provider["metadata"] == {"payment_id": body["id"]}
    [request] = fake.requests_to("POST", "/v3/payments")
    assert request.idempotence_key == body["id"]
    # nothing is credited before YooKassa says the payment succeeded
    assert await db.balance(admin, row["user_id"]) == 5


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_same_idempotency_key_is_one_payment_and_the_same_answer(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    first = await buy("device-repeat-01", key="buy-once", version=version)
    second = await buy("device-repeat-01", key="buy-once", version=version)
    assert first.status == second.status == 201
    assert first.body == second.body
    # the key naming another package: the payer is not sent to pay for the first
    third = await buy("device-repeat-01", "premium_month", key="buy-once", version=version)
    assert third.status == 409 and third.body["error"] == "conflict"
    assert "tokens_50" in third.body["message"]
    assert await payment_count(admin) == 1
    assert len(fake.payments) == 1
    assert len(fake.requests_to("POST", "/v3/payments")) == 1


async def test_the_same_key_from_two_users_is_two_payments(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    mine = await buy("device-key-owner-a", key="shared-key")
    theirs = await buy("device-key-owner-b", key="shared-key")
    assert mine.status == theirs.status == 201
    assert mine.body["id"] != theirs.body["id"]
    assert await payment_count(admin) == 2 and len(fake.payments) == 2


async def test_without_a_key_every_request_is_a_new_payment(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    first = await buy("device-nokey-001")
    second = await buy("device-nokey-001")
    assert first.status == second.status == 201
    assert first.body["id"] != second.body["id"]
    keys = [row["idempotency_key"] for row in await admin.fetch("select idempotency_key from payments")]
    assert len(set(keys)) == 2 and all(key.startswith("auto:") for key in keys)
    assert len(fake.payments) == 2


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("package_id", ["tokens_9000", "TOKENS_50", "", "x" * 65, "../tokens_50"])
async def test_an_unknown_package_is_refused_and_nothing_is_written(
    version: str, package_id: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    response = await buy("device-unknown-pk", package_id, key="unknown-package", version=version)
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert response.body["details"][0]["loc"][-1] == "package_id"
    assert await payment_count(admin) == 0
    assert fake.requests == []
    # not even the new device's user, its welcome bonus or its signup slot
    assert await admin.fetchval("select count(*) from users") == 0
    assert await admin.fetchval("select count(*) from usage_logs") == 0


async def test_a_package_added_while_the_function_is_warm_can_be_bought(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    """The ids a process has seen are remembered; one it has not seen is
    looked up again, so a package added without a deploy sells at once."""
    assert (await buy("device-new-pkg-01", "tokens_50")).status == 201
    await admin.execute(
        "insert into token_packages (id, kind, tokens, amount, currency, description, sort_order)"
        " values ('tokens_1000', 'tokens', 1000, 99900, 'RUB', '1000 tokens', 50)"
    )
    bought = await buy("device-new-pkg-01", "tokens_1000")
    assert bought.status == 201
    assert bought.body["package_id"] == "tokens_1000"
    assert await payment_count(admin) == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [("not json", 400), ({}, 422), ({"package_id": 50}, 422), ({"package_id": "tokens_50", "tip": 1}, 422)],
)
async def test_a_bad_body_is_refused_before_anything_is_written(
    body: Any, status: int, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    event = EVENT_BUILDERS["v2"]("POST", "/api/payments", headers=user_headers("device-badbody1"), body=body)
    response = await invoke(payments.handler, event)
    assert (response.status, response.body["error"]) == (status, "invalid_request")
    assert await payment_count(admin) == 0 and fake.requests == []
    # not even the new device's user, its welcome bonus or its signup slot
    assert await admin.fetchval("select count(*) from users where device_id = 'device-badbody1'") == 0
    assert await admin.fetchval("select count(*) from token_transactions") == 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/packages", None),
        ("POST", "/api/payments", {"package_id": "tokens_50"}),
        ("GET", "/api/payments/00000000-0000-4000-8000-000000000000", None),
    ],
)
async def test_a_stray_query_parameter_is_422_and_writes_nothing(
    version: str, method: str, path: str, body: Any, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    """`?package_id=premium_month` must not pass silently beside the body's."""
    event = EVENT_BUILDERS[version](
        method,
        path,
        headers=user_headers("device-stray-q1"),
        body=body,
        query={"package_id": "premium_month"},
    )
    response = await invoke(payments.handler, event)
    assert (response.status, response.body["details"][0]["loc"]) == (422, ["query", "package_id"])
    assert await payment_count(admin) == 0 and fake.requests == []
    assert await admin.fetchval("select count(*) from users") == 0


@pytest.mark.parametrize("version", VERSIONS)
async def test_creating_needs_a_caller(version: str, fake: FakeYooKassa, admin: asyncpg.Connection) -> None:
    headers = {"Content-Type": "application/json"}
    event = EVENT_BUILDERS[version](
        "POST", "/api/payments", headers=headers, body={"package_id": "tokens_50"}
    )
    response = await invoke(payments.handler, event)
    assert (response.status, response.body["error"]) == (401, "unauthorized")
    assert await payment_count(admin) == 0 and fake.requests == []


# ------------------------------------------------------- the provider failing


@pytest.mark.parametrize("version", VERSIONS)
async def test_yookassa_down_is_503_and_the_repeat_completes_the_same_payment(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    fake.go_down()
    down = await buy("device-down-0001", key="while-down", version=version)
    assert (down.status, down.body["error"]) == (503, "unavailable")
    assert int(down.headers["retry-after"]) >= 1
    [row] = await admin.fetch("select * from payments")
    # stored, pending, and not yet anybody's at YooKassa
    assert (row["status"], row["provider_payment_id"], row["confirmation_url"]) == ("pending", None, None)
    assert fake.payments == {}

    fake.recover()
    repeat = await buy("device-down-0001", key="while-down", version=version)
    assert repeat.status == 201 and repeat.body["id"] == str(row["id"])
    again = await buy("device-down-0001", key="while-down", version=version)
    assert again.body == repeat.body
    assert await payment_count(admin) == 1 and len(fake.payments) == 1
    # every attempt, failed or not, named the same provider payment
    keys = {request.idempotence_key for request in fake.requests_to("POST", "/v3/payments")}
    assert keys == {str(row["id"])}


async def test_a_lost_answer_from_yookassa_is_completed_without_a_second_provider_payment(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    """YooKassa made the payment but its answer never reached us (the Lambda
    timed out): the repeat asks again under the same Idempotence-Key and
    attaches the payment YooKassa already made."""
    fake.go_down()
    assert (await buy("device-lostans-1", key="lost-answer")).status == 503
    fake.recover()
    stored = Payment.model_validate(dict(await admin.fetchrow("select * from payments")))
    client = YooKassaClient(YooKassaSettings(fake.shop_id, fake.secret_key, fake.api_url, RETURN_URL))
    try:
        made = await client.create_payment(stored, payments._description(stored))
    finally:
        await client.aclose()

    repeat = await buy("device-lostans-1", key="lost-answer")
    assert repeat.status == 201
    assert (await payment_row(admin, stored.id))["provider_payment_id"] == made.id
    assert list(fake.payments) == [made.id]


async def test_a_payment_yookassa_never_made_is_abandoned_after_a_day_and_never_made_later(
    fake: FakeYooKassa, admin: asyncpg.Connection, lambda_runtime: LambdaRuntime
) -> None:
    """YooKassa was down and the client gave up: the reconciler cancels the
    payment after a day, and a late repeat of the request is a 409 that
    creates nothing at YooKassa, so nothing payable exists for a payment we
    would no longer credit. One younger than a day is left for its repeat."""
    fake.go_down()
    assert (await buy("device-abandon-1", key="given-up")).status == 503
    assert (await buy("device-abandon-1", key="still-trying")).status == 503
    await admin.execute(
        "update payments set created_at = now() - interval '25 hours' where idempotency_key = 'given-up'"
    )
    fake.recover()

    def reconcile() -> Any:
        return jobs.reconcile_payments()

    assert await lambda_runtime.run(reconcile) == {
        "checked": 0,
        "changed": 0,
        "failed": 0,
        "abandoned": 1,
        "refunds": 0,
    }
    assert await lambda_runtime.run(reconcile) == {
        "checked": 0,
        "changed": 0,
        "failed": 0,
        "abandoned": 0,
        "refunds": 0,
    }
    rows = {row["idempotency_key"]: row for row in await admin.fetch("select * from payments")}
    assert (rows["given-up"]["status"], rows["given-up"]["provider_payment_id"]) == ("canceled", None)
    assert rows["still-trying"]["status"] == "pending"

    late = await buy("device-abandon-1", key="given-up")
    assert (late.status, late.body["error"]) == (409, "conflict")
    assert "new Idempotency-Key" in late.body["message"]
    assert fake.payments == {}
    assert (await payment_row(admin, rows["given-up"]["id"]))["status"] == "canceled"

    assert (await buy("device-abandon-1", key="still-trying")).status == 201
    assert len(fake.payments) == 1
    user_id = await user_of_device(admin, "device-abandon-1")
    assert [row["type"] for row in await db.ledger(admin, user_id)] == ["bonus"]


async def test_yookassa_refusing_our_credentials_is_503_not_the_callers_fault(
    fake: FakeYooKassa, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_revoked")
    settings.reset()
    response = await buy("device-badcreds", key="bad-credentials")
    assert (response.status, response.body["error"]) == (503, "unavailable")
    assert (await admin.fetchval("select provider_payment_id from payments")) is None


class ShortOfTime(LambdaContext):
    """An invocation with 3.5 s left: the provider gets the 1 s minimum."""

    def get_remaining_time_in_millis(self) -> int:
        return 3_500


async def test_a_slow_yookassa_is_cut_short_by_the_lambdas_remaining_time(
    fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    fake.go_slow(60)
    slow = await buy("device-slow-0001", key="slow", context=ShortOfTime())
    assert (slow.status, slow.body["error"]) == (503, "unavailable")
    fake.recover()
    assert (await buy("device-slow-0001", key="slow")).status == 201
    assert await payment_count(admin) == 1 and len(fake.payments) == 1


async def test_the_secret_key_from_secrets_manager_reaches_yookassa(
    fake: FakeYooKassa, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_stale_plain_value")
    with mock_aws():
        secrets = boto3.client("secretsmanager", region_name="eu-central-1")
        arn = secrets.create_secret(Name="dreamlens/test/yookassa", SecretString=fake.secret_key)["ARN"]
        monkeypatch.setenv("YOOKASSA_SECRET_KEY_SECRET_ARN", arn)
        settings.reset()
        response = await buy("device-vaulted-1")
    assert response.status == 201
    assert len(fake.payments) == 1


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_owner_reads_the_payment_and_another_user_gets_404(
    version: str, fake: FakeYooKassa, admin: asyncpg.Connection
) -> None:
    created = (await buy("device-owner-001", "pro_month", version=version)).body
    mine = await invoke(payments.handler, get_payment_event(version, created["id"], "device-owner-001"))
    assert mine.status == 200
    shown = ("id", "package_id", "status", "amount", "currency", "tokens")
    assert {key: mine.body[key] for key in shown} == {
        "id": created["id"],
        "package_id": "pro_month",
        "status": "pending",
        "amount": 49900,
        "currency": "RUB",
        "tokens": 200,
    }
    assert mine.body["confirmation_url"] == created["confirmation_url"]
    assert (mine.body["refunded_amount"], mine.body["paid_at"]) == (0, None)
    assert "provider_payment_id" not in mine.body and "refund_shortfall" not in mine.body

    theirs = await invoke(payments.handler, get_payment_event(version, created["id"], "device-stranger1"))
    assert (theirs.status, theirs.body["error"]) == (404, "not_found")


@pytest.mark.parametrize("payment_id", ["0b7d3a52-6a43-4c8e-9a55-2f9f0c1e5d11", "not-a-uuid", "webhook"])
async def test_a_payment_that_is_not_there_is_404(payment_id: str, fake: FakeYooKassa) -> None:
    response = await invoke(payments.handler, get_payment_event("v2", payment_id, "device-nothing-1"))
    assert (response.status, response.body["error"]) == (404, "not_found")


async def test_reading_needs_a_caller(fake: FakeYooKassa) -> None:
    created = (await buy("device-reader-01")).body
    event = EVENT_BUILDERS["v1"]("GET", f"/api/payments/{created['id']}")
    assert (await invoke(payments.handler, event)).status == 401


async def test_a_warm_create_costs_few_round_trips(
    fake: FakeYooKassa, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the caller is known (30 s identity cache), a new payment is two
    statements: store it, attach YooKassa's payment."""
    capture_logs(caplog)
    await buy("device-warm-0001", key="warm-1")
    caplog.clear()
    assert (await buy("device-warm-0001", key="warm-2")).status == 201
    [line] = request_lines(caplog)
    assert (line["route"], line["db_statements"]) == ("/api/payments", 2)
    caplog.clear()
    assert (await buy("device-warm-0001", key="warm-2")).status == 201
    [line] = request_lines(caplog)
    assert line["db_statements"] == 1  # the repeat: found, nothing to complete


# ---------------------------------------------------------------- contracts


def test_reading_payments_does_not_import_the_yookassa_client() -> None:
    """A cold start that only lists packages or reads a payment skips httpx."""
    code = (
        "import sys, functions.payments; print('functions.yookassa' in sys.modules, 'httpx' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["False", "False"]


def test_each_module_serves_exactly_its_serverless_routes() -> None:
    functions = yaml.safe_load(SERVERLESS.read_text())["functions"]
    for name, module in (("payments", payments), ("webhook", webhook)):
        declared = {event["httpApi"] for event in functions[name]["events"]}
        served = {
            f"{method} {route.path.replace(':uuid', '')}"
            for route in module.routes
            for method in route.methods or ()
            if method != "HEAD"
        }
        assert served == declared
        assert functions[name]["handler"] == f"functions/{name}.handler"


def test_the_openapi_document_describes_every_payments_endpoint() -> None:
    spec = document([*payments.routes, *webhook.routes])
    paths = spec["paths"]
    assert set(paths) == {"/api/packages", "/api/payments", "/api/payments/{id}", "/api/payments/webhook"}
    schemas = spec["components"]["schemas"]
    assert "minor units" in schemas["PackageItem"]["properties"]["amount"]["description"]
    assert "minor units" in paths["/api/packages"]["get"]["description"]
    create = paths["/api/payments"]["post"]
    assert set(create["responses"]) >= {"201", "401", "422", "503"}
    assert create["responses"]["503"]["headers"]["Retry-After"]
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert paths["/api/packages"]["get"]["security"] == []
    assert "404" in paths["/api/payments/{id}"]["get"]["responses"]
    hook = paths["/api/payments/webhook"]["post"]
    assert set(hook["responses"]) >= {"200", "400", "403", "503"}
    assert schemas["WebhookAck"]["properties"]["outcome"]["enum"] == [
        "credited",
        "applied",
        "unchanged",
        "ignored",
        "unknown_payment",
    ]
    json.dumps(spec)  # serializable as served


def test_a_created_payment_body_has_the_documented_fields() -> None:
    fields = set(payments.PaymentCreated.model_fields)
    assert fields == {"id", "status", "confirmation_url", "amount", "currency", "package_id"}
