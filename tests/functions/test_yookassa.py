"""functions/yookassa.py: notification parsing on YooKassa's own samples,
amounts, trusted sources, and the client against the fake over real HTTP."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import boto3
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from moto import mock_aws

from database import ConfigurationError, InvalidRequest, ProviderUnavailable
from functions import settings, yookassa
from functions.fake_yookassa import FakeYooKassa, start_fake_yookassa
from functions.yookassa import (
    TRUSTED_NETWORKS,
    YooKassaClient,
    YooKassaSettings,
    amount_to_minor_units,
    close_default_client,
    default_client,
    idempotence_key,
    is_trusted_source,
    lambda_budget,
    minor_units_to_amount,
    parse_notification,
    time_budget,
)
from repositories.payments import (
    Payment,
    apply_provider_status,
    apply_refund,
    attach_provider_payment,
    create_pending_payment,
)
from tests import db

EVENTS = Path(__file__).parent.parent / "events" / "yookassa"
RETURN_URL = "https://app.dreamlens.test/payments/return"


def sample(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text(encoding="utf-8"))
    return loaded


def variant_of_waiting(event: str, status: str, **changes: Any) -> dict[str, Any]:
    """payment.succeeded / payment.canceled built from the captured sample."""
    notification = copy.deepcopy(sample("payment.waiting_for_capture"))
    notification["event"] = event
    notification["object"].update(status=status, **changes)
    return notification


def a_payment(amount: int = 9900, currency: str = "RUB") -> Payment:
    now = datetime.now(UTC)
    return Payment(
        id=uuid4(),
        user_id=uuid4(),
        package_id="tokens_50",
        status="pending",
        amount=amount,
        currency=currency,
        tokens=50,
        provider_payment_id=None,
        confirmation_url=None,
        refunded_amount=0,
        refund_shortfall=0,
        created_at=now,
        updated_at=now,
        paid_at=None,
    )


# ------------------------------------------------------------ notifications


def test_waiting_for_capture_sample_parses() -> None:
    notification = parse_notification(sample("payment.waiting_for_capture"))
    assert notification.event == "payment.waiting_for_capture"
    assert notification.object_id == notification.payment_id == "22d6d597-000f-5000-9000-145f6df21d6f"
    assert (notification.refund_amount, notification.object_status) == (None, "waiting_for_capture")
    assert not notification.ignored


@pytest.mark.parametrize(
    ("event", "status", "changes"),
    [
        ("payment.succeeded", "succeeded", {"refundable": True}),
        (
            "payment.canceled",
            "canceled",
            {
                "paid": False,
                "cancellation_details": {"party": "yoo_money", "reason": "expired_on_confirmation"},
            },
        ),
    ],
)
def test_succeeded_and_canceled_variants_parse(event: str, status: str, changes: dict[str, Any]) -> None:
    notification = parse_notification(variant_of_waiting(event, status, **changes))
    assert (notification.event, notification.object_status) == (event, status)
    assert notification.payment_id == "22d6d597-000f-5000-9000-145f6df21d6f"
    assert not notification.ignored


def test_refund_sample_with_a_json_number_amount_parses_exactly() -> None:
    notification = parse_notification(sample("refund.succeeded"))
    assert notification.event == "refund.succeeded"
    assert notification.object_id == "21b23b5b-000f-5061-a000-0674e49a8c10"
    assert notification.payment_id == "21b23365-000f-500b-9000-070fa3554403"
    assert notification.refund_amount == 25000
    assert not notification.ignored


@pytest.mark.parametrize("name", ["deal.closed", "payout.succeeded"])
def test_events_we_do_not_use_are_recognised_as_ignored(name: str) -> None:
    notification = parse_notification(sample(name))
    assert notification.ignored
    assert notification.event == name
    assert notification.payment_id is None and notification.refund_amount is None
    assert notification.object_id == sample(name)["object"]["id"]


def test_raw_body_parses_like_the_decoded_one() -> None:
    raw = (EVENTS / "refund.succeeded.json").read_bytes()
    assert parse_notification(raw) == parse_notification(sample("refund.succeeded"))


def _broken(path: tuple[str, ...], value: Any) -> bytes:
    notification = (
        sample("refund.succeeded") if path[:1] == ("refund",) else sample("payment.waiting_for_capture")
    )
    target = notification
    keys = path[1:] if path[:1] == ("refund",) else path
    for key in keys[:-1]:
        target = target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return json.dumps(notification).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b"{}",
        _broken(("type",), "event"),
        _broken(("type",), KeyError),
        _broken(("event",), KeyError),
        _broken(("event",), "payment"),
        _broken(("event",), 42),
        _broken(("object",), KeyError),
        _broken(("object",), "22d6d597"),
        _broken(("object", "id"), KeyError),
        _broken(("object", "id"), ""),
        _broken(("object", "id"), "../../payments"),
        _broken(("refund", "object", "payment_id"), KeyError),
        _broken(("refund", "object", "amount"), KeyError),
        _broken(("refund", "object", "amount", "value"), "abc"),
        _broken(("refund", "object", "amount", "value"), "1.005"),
        _broken(("refund", "object", "amount", "value"), "-5.00"),
        _broken(("refund", "object", "amount", "value"), "0.00"),
        _broken(("refund", "object", "amount", "currency"), "rub"),
    ],
)
def test_malformed_notifications_are_invalid_requests(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_notification(body)


# ------------------------------------------------------------------ amounts


@pytest.mark.parametrize(
    ("value", "minor"),
    [("99.00", 9900), ("0.01", 1), ("2.00", 200), (250.0, 25000), (5, 500), ("1499", 149900), ("0.10", 10)],
)
def test_provider_amounts_become_exact_minor_units(value: object, minor: int) -> None:
    assert amount_to_minor_units(value) == minor


@pytest.mark.parametrize("value", ["1.005", "-1.00", "NaN", "Infinity", "", "abc", None, True, [], 0.1 + 0.2])
def test_inexact_or_garbage_amounts_are_refused(value: object) -> None:
    with pytest.raises(InvalidRequest):
        amount_to_minor_units(value)


@pytest.mark.parametrize("value", ["1e999999999", "1E+999999", "9" * 400, 2**70, "92233720368547758.08"])
def test_amounts_too_large_to_store_are_refused_not_a_crash(value: object) -> None:
    """Regression: '1e999999999' is a finite Decimal whose `* 100` overflowed
    the decimal context, so a notification carrying it was a 500 (and a
    5,000-digit amount became a 5,000-digit int). Amounts must fit the bigint
    minor units they are stored as."""
    with pytest.raises(InvalidRequest):
        amount_to_minor_units(value)


def test_the_largest_storable_amount_is_accepted() -> None:
    assert amount_to_minor_units("92233720368547758.07") == 2**63 - 1


def test_a_notification_nested_deeper_than_the_parser_goes_is_invalid() -> None:
    """Regression: 30,000 nested arrays (60 KB, within the body limit) made
    json.loads raise RecursionError, which escaped as a 500 from the webhook."""
    with pytest.raises(InvalidRequest):
        parse_notification("[" * 30_000 + "]" * 30_000)


def test_minor_units_become_the_providers_decimal_string() -> None:
    assert [minor_units_to_amount(m) for m in (9900, 1, 0, 10, 149900)] == [
        "99.00",
        "0.01",
        "0.00",
        "0.10",
        "1499.00",
    ]
    with pytest.raises(InvalidRequest):
        minor_units_to_amount(-1)


@hypothesis_settings(deadline=None)  # a scheduling stall on a loaded machine is not a failure
@given(st.integers(min_value=0, max_value=10**15))
def test_amounts_round_trip_exactly(minor: int) -> None:
    assert amount_to_minor_units(minor_units_to_amount(minor)) == minor


# ---------------------------------------------------------- trusted sources


@pytest.mark.parametrize(
    "ip",
    [
        "185.71.76.1",
        "185.71.76.1/32",
        "185.71.77.30",
        "77.75.153.5",
        "77.75.156.11",
        "77.75.156.35/32",
        "77.75.154.200",
        "2a02:5180::1",
        "2a02:5180:0:1509::17/128",
        "::ffff:185.71.76.2",
        " 185.71.76.3 ",
    ],
)
def test_yookassa_addresses_are_trusted(ip: str) -> None:
    assert is_trusted_source(ip)


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.0.0.1/32",
        "10.0.0.1",
        "77.75.156.12",
        "185.71.76.32",
        "::1",
        "185.71.76.0/27",
        "185.71.76.1/24",
        "",
        "garbage",
        "999.1.1.1",
        "185.71.76.1/33",
        None,
        3232235777,
    ],
)
def test_others_and_garbage_are_not(ip: Any) -> None:
    assert not is_trusted_source(ip)


def test_environment_overrides_the_trusted_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read through functions/settings.py: kept for the cold start, so each
    change of the environment is followed by settings.reset()."""
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32, ::1/128")
    settings.reset()
    assert is_trusted_source("127.0.0.1")
    assert is_trusted_source("::1")
    assert not is_trusted_source("185.71.76.1")
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32, not-a-network")
    settings.reset()
    with pytest.raises(ConfigurationError):
        is_trusted_source("127.0.0.1")
    monkeypatch.delenv("YOOKASSA_TRUSTED_NETWORKS")
    settings.reset()
    assert is_trusted_source("185.71.76.1")


def test_explicit_networks_win() -> None:
    assert is_trusted_source("10.1.2.3", ["10.0.0.0/8"])
    assert not is_trusted_source("185.71.76.1", ["10.0.0.0/8"])
    assert is_trusted_source("185.71.76.1", TRUSTED_NETWORKS)


# ------------------------------------------------------------------ client


class Sleeps(list[float]):
    """Backoff recorded, not waited for."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
async def running_fake() -> AsyncIterator[FakeYooKassa]:
    """One server per module (uvicorn's start and stop cost more than the
    tests), reset before every test."""
    started = await start_fake_yookassa()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
def fake(running_fake: FakeYooKassa) -> FakeYooKassa:
    running_fake.reset()
    return running_fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def client_for(fake: FakeYooKassa, sleeps: Sleeps, **options: Any) -> YooKassaClient:
    configured = YooKassaSettings(fake.shop_id, fake.secret_key, fake.api_url, RETURN_URL)
    return YooKassaClient(configured, backoff=0.2, sleep=sleeps, **options)


@pytest.fixture
async def client(fake: FakeYooKassa, sleeps: Sleeps) -> AsyncIterator[YooKassaClient]:
    made = client_for(fake, sleeps)
    yield made
    await made.aclose()


async def test_create_sends_the_documented_request(fake: FakeYooKassa, client: YooKassaClient) -> None:
    payment = a_payment()
    created = await client.create_payment(payment, "50 tokens", RETURN_URL)
    assert (created.status, created.amount, created.currency, created.paid) == ("pending", 9900, "RUB", False)
    assert created.metadata == {"payment_id": str(payment.id)}
    assert created.confirmation_url == f"{fake.base_url}/_fake/checkout/{created.id}"
    stored = fake.payments[created.id]
    assert stored["amount"] == {"value": "99.00", "currency": "RUB"}
    assert stored["confirmation"]["return_url"] == RETURN_URL
    assert stored["description"] == "50 tokens"
    [request] = fake.requests_to("POST", "/v3/payments")
    assert request.idempotence_key == idempotence_key(payment) == str(payment.id)


async def test_same_payment_created_twice_is_one_provider_payment(
    fake: FakeYooKassa, client: YooKassaClient
) -> None:
    payment = a_payment()
    first = await client.create_payment(payment, "50 tokens")
    second = await client.create_payment(payment, "50 tokens")
    assert first == second
    assert len(fake.payments) == 1
    assert len(fake.requests_to("POST", "/v3/payments")) == 2


async def test_get_returns_the_providers_status(fake: FakeYooKassa, client: YooKassaClient) -> None:
    created = await client.create_payment(a_payment(), "50 tokens")
    await fake.succeed(created.id)
    fetched = await client.get_payment(created.id)
    assert (fetched.id, fetched.status, fetched.paid, fetched.amount) == (created.id, "succeeded", True, 9900)


async def test_get_refund_reads_the_refund(fake: FakeYooKassa, client: YooKassaClient) -> None:
    created = await client.create_payment(a_payment(), "50 tokens")
    await fake.succeed(created.id)
    notification = await fake.refund(created.id, 2550)
    refund = await client.get_refund(notification["object"]["id"])
    assert (refund.payment_id, refund.status, refund.amount, refund.currency) == (
        created.id,
        "succeeded",
        2550,
        "RUB",
    )


@pytest.mark.parametrize("minor", [1, 10, 9900, 149900, 123456789])
async def test_amounts_round_trip_through_the_provider(client: YooKassaClient, minor: int) -> None:
    created = await client.create_payment(a_payment(amount=minor), "odd amount")
    assert created.amount == minor
    assert (await client.get_payment(created.id)).amount == minor


@pytest.mark.parametrize("status", [503, 500])
async def test_provider_down_is_unavailable_after_three_attempts(
    fake: FakeYooKassa, client: YooKassaClient, sleeps: Sleeps, status: int
) -> None:
    fake.go_down(status)
    with pytest.raises(ProviderUnavailable):
        await client.create_payment(a_payment(), "50 tokens")
    assert len(fake.requests_to("POST", "/v3/payments")) == 3
    assert sleeps == [0.2, 0.4]
    with pytest.raises(ProviderUnavailable):
        await client.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")
    assert len(fake.requests_to("GET", "/v3/payments/22d6d597-000f-5000-9000-145f6df21d6f")) == 3
    assert fake.payments == {}


async def test_a_transient_failure_is_retried_with_the_same_key(
    fake: FakeYooKassa, client: YooKassaClient
) -> None:
    fake.fail_next(2, status=500)
    payment = a_payment()
    created = await client.create_payment(payment, "50 tokens")
    attempts = fake.requests_to("POST", "/v3/payments")
    assert [a.idempotence_key for a in attempts] == [str(payment.id)] * 3
    assert list(fake.payments) == [created.id]


async def test_slow_provider_times_out_into_unavailable(fake: FakeYooKassa, sleeps: Sleeps) -> None:
    fake.go_slow(60)
    client = client_for(fake, sleeps, read_timeout=0.2)
    try:
        with pytest.raises(ProviderUnavailable) as raised:
            await client.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")
    finally:
        await client.aclose()
    assert raised.value.__cause__ is not None
    assert len(fake.requests) == 3


async def test_nobody_listening_is_unavailable(sleeps: Sleeps) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configured = YooKassaSettings("100500", "test_secret", f"http://127.0.0.1:{port}/v3", RETURN_URL)
    client = YooKassaClient(configured, sleep=sleeps)
    try:
        with pytest.raises(ProviderUnavailable):
            await client.create_payment(a_payment(), "50 tokens")
    finally:
        await client.aclose()
    assert len(sleeps) == 2


async def test_a_body_that_cannot_be_decoded_is_unavailable(sleeps: Sleeps) -> None:
    """A reply marked gzip whose body is not (a proxy's fault, a cut
    connection): httpx raises DecodingError, which is not a TransportError.
    It escaped as a 500, and in the reconciler it ended the run before the
    payment was marked asked, so every later run stopped at the same one."""
    broken = b"not gzip at all"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: " + str(len(broken)).encode() + b"\r\nConnection: close\r\n\r\n" + broken
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    configured = YooKassaSettings("100500", "test_secret", f"http://127.0.0.1:{port}/v3", RETURN_URL)
    client = YooKassaClient(configured, sleep=sleeps)
    try:
        with pytest.raises(ProviderUnavailable):
            await client.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert len(sleeps) == 2  # a GET is repeated, as for any answer that did not arrive whole


async def test_the_deadline_bounds_the_retries(fake: FakeYooKassa, sleeps: Sleeps) -> None:
    ticks = iter([0.0, 1.0, 19.9])
    client = client_for(fake, sleeps, clock=lambda: next(ticks))
    fake.go_down()
    try:
        with pytest.raises(ProviderUnavailable):
            await client.get_payment("pp-1")
    finally:
        await client.aclose()
    # a third attempt starting at 20.3 s could last 13 s: past the 27 s deadline
    assert len(fake.requests) == 2


async def test_wrong_credentials_are_refused_once(fake: FakeYooKassa, sleeps: Sleeps) -> None:
    configured = YooKassaSettings(fake.shop_id, "test_wrong", fake.api_url, RETURN_URL)
    client = YooKassaClient(configured, sleep=sleeps)
    try:
        with pytest.raises(InvalidRequest) as raised:
            await client.create_payment(a_payment(), "50 tokens")
    finally:
        await client.aclose()
    assert raised.value.details["provider_status"] == 401  # type: ignore[index]
    assert len(fake.requests) == 1 and sleeps == []


async def test_unknown_payment_is_refused_once(
    fake: FakeYooKassa, client: YooKassaClient, sleeps: Sleeps
) -> None:
    with pytest.raises(InvalidRequest):
        await client.get_payment("2f3b588d-000f-5000-8000-1d6e87c7fbde")
    assert len(fake.requests) == 1 and sleeps == []


async def test_too_many_requests_is_unavailable_not_retried(
    fake: FakeYooKassa, client: YooKassaClient, sleeps: Sleeps
) -> None:
    fake.fail_next(1, status=429)
    with pytest.raises(ProviderUnavailable):
        await client.get_payment("pp-1")
    assert len(fake.requests) == 1 and sleeps == []


@pytest.mark.parametrize("provider_id", ["", "../refunds/x", "a b", "x" * 101])
async def test_a_garbage_id_never_reaches_the_provider(
    fake: FakeYooKassa, client: YooKassaClient, provider_id: str
) -> None:
    with pytest.raises(InvalidRequest):
        await client.get_payment(provider_id)
    assert fake.requests == []


async def test_one_http_client_serves_every_call(client: YooKassaClient) -> None:
    created = await client.create_payment(a_payment(), "50 tokens")
    first = client._client()
    await client.get_payment(created.id)
    assert client._client() is first


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOOKASSA_SHOP_ID", "100500")
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "live_secret")
    monkeypatch.delenv("YOOKASSA_API_URL", raising=False)
    monkeypatch.setenv("YOOKASSA_RETURN_URL", RETURN_URL)
    settings.reset()
    configured = YooKassaSettings.from_env()
    assert configured == YooKassaSettings("100500", "live_secret", "https://api.yookassa.ru/v3", RETURN_URL)
    monkeypatch.delenv("YOOKASSA_SECRET_KEY")
    settings.reset()
    with pytest.raises(ConfigurationError, match="YOOKASSA_SECRET_KEY"):
        YooKassaSettings.from_env()


def test_the_secret_key_may_come_from_secrets_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """serverless.yml deploys YOOKASSA_SECRET_KEY_SECRET_ARN, never the key itself."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("YOOKASSA_SHOP_ID", "100500")
    monkeypatch.delenv("YOOKASSA_SECRET_KEY", raising=False)
    monkeypatch.setenv("YOOKASSA_RETURN_URL", RETURN_URL)
    with mock_aws():
        secrets = boto3.client("secretsmanager", region_name="eu-central-1")
        document = json.dumps({"YOOKASSA_SECRET_KEY": "live_from_the_vault"})
        arn = secrets.create_secret(Name="dreamlens/test/app", SecretString=document)["ARN"]
        monkeypatch.setenv("YOOKASSA_SECRET_KEY_SECRET_ARN", arn)
        settings.reset()
        assert default_client().settings.secret_key == "live_from_the_vault"


def test_the_default_client_is_kept_until_the_settings_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOOKASSA_SHOP_ID", "100500")
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_one")
    settings.reset()
    first = default_client()
    assert default_client() is first
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_two")
    assert default_client() is first  # kept for the cold start
    settings.reset()
    second = default_client()
    assert second is not first and second.settings.secret_key == "test_two"


async def test_a_replaced_default_client_closes_its_connections(
    fake: FakeYooKassa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YOOKASSA_SHOP_ID", fake.shop_id)
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", fake.secret_key)
    monkeypatch.setenv("YOOKASSA_API_URL", fake.api_url)
    settings.reset()
    old = default_client()
    with pytest.raises(InvalidRequest):
        await old.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")  # a connection is open now
    http = old._client()
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_rotated")
    settings.reset()
    new = default_client()
    try:
        assert new is not old
        await asyncio.gather(*yookassa._retiring)  # the closing runs in the background
        assert http.is_closed
    finally:
        await close_default_client()


class RemainingTime:
    def __init__(self, millis: object) -> None:
        self.millis = millis

    def get_remaining_time_in_millis(self) -> object:
        return self.millis


@pytest.mark.parametrize(
    ("context", "budget"),
    [
        (None, 27.0),
        (object(), 27.0),
        (RemainingTime(15_000), 12.0),
        (RemainingTime(900_000), 27.0),
        (RemainingTime(3_500), 1.0),
        (RemainingTime(0), 1.0),
        (RemainingTime("soon"), 27.0),
    ],
)
def test_a_lambdas_remaining_time_bounds_the_provider(context: object, budget: float) -> None:
    assert lambda_budget(context) == budget


async def test_the_time_budget_cuts_a_slow_provider_short(fake: FakeYooKassa, sleeps: Sleeps) -> None:
    fake.go_slow(60)
    client = client_for(fake, sleeps)  # its own timeouts would wait 13 s an attempt
    try:
        with time_budget(0.3), pytest.raises(ProviderUnavailable, match="in time"):
            await client.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")
        fake.recover()
        # outside the block nothing is bounded but the client's own timeouts
        with pytest.raises(InvalidRequest):
            await client.get_payment("22d6d597-000f-5000-9000-145f6df21d6f")
    finally:
        await client.aclose()
    # no retry was started inside the budget; on a loaded machine the cut-short
    # request may not even have reached the provider before the budget ended
    assert 1 <= len(fake.requests) <= 2
    assert fake.requests[-1].path == "/v3/payments/22d6d597-000f-5000-9000-145f6df21d6f"


async def test_no_return_url_anywhere_is_a_configuration_error(fake: FakeYooKassa, sleeps: Sleeps) -> None:
    client = YooKassaClient(YooKassaSettings(fake.shop_id, fake.secret_key, fake.api_url), sleep=sleeps)
    with pytest.raises(ConfigurationError, match="YOOKASSA_RETURN_URL"):
        await client.create_payment(a_payment(), "50 tokens")
    assert fake.requests == []


# ---------------------------------------------------- the whole money path


async def test_purchase_and_refund_through_the_fake_credit_and_reverse_once(
    admin: asyncpg.Connection, fake: FakeYooKassa, client: YooKassaClient
) -> None:
    """What the payments functions will do: create, attach, and apply the
    provider's notifications after re-reading the status from the API."""
    user_id = await db.insert_user(admin, clerk_id="user_buyer")
    payment, _ = await create_pending_payment(user_id, "tokens_200", "key-flow")
    created = await client.create_payment(payment, "200 tokens")
    payment = await attach_provider_payment(payment.id, created.id, created.confirmation_url)

    succeeded = json.dumps(await fake.succeed(created.id)).encode()
    for _ in range(2):  # YooKassa may deliver a notification more than once
        notification = parse_notification(succeeded)
        assert notification.payment_id is not None
        status = (await client.get_payment(notification.payment_id)).status
        await apply_provider_status(notification.payment_id, status)
    assert await db.balance(admin, user_id) == 10 + 200

    refund = parse_notification(await fake.refund(created.id, 14950))
    assert refund.payment_id is not None and refund.refund_amount is not None
    verified = await client.get_refund(refund.object_id)
    for _ in range(2):
        await apply_refund(refund.payment_id, verified.id, verified.amount)
    assert await db.balance(admin, user_id) == 10 + 100
    assert await db.audit_problems(admin) == []
